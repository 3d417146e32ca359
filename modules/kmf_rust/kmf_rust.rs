// SPDX-License-Identifier: GPL-2.0

//! kmodforge example in Rust: a module parameter and kernel allocations.
//!
//! Linux 6.12's `module!` macro cannot declare parameters yet (that came later
//! upstream), so `repeat` is declared the way C's `module_param(repeat, int, 0444)`
//! declares it: a `struct kernel_param` in the `__param` section, which the module
//! loader parses before `init` runs, and its `parmtype`/`parm` strings in `.modinfo`.

use kernel::bindings;
use kernel::prelude::*;

module! {
    type: KmfRust,
    name: "kmf_rust",
    author: "kmodforge",
    description: "kmodforge example: a Rust module with a parameter",
    license: "GPL",
}

/// How many greetings to log (1-10). Written only by the kernel's parameter parsing,
/// before `init` runs; read-only in sysfs (0444).
static mut REPEAT: i32 = 1;

/// A parameter descriptor, as `module_param()` emits it.
#[repr(transparent)]
struct Param(bindings::kernel_param);

// SAFETY: the descriptor is never written; the kernel reads it while loading the module.
unsafe impl Sync for Param {}

#[used(compiler)]
#[link_section = "__param"]
pub static PARAM_REPEAT: Param = Param(bindings::kernel_param {
    name: c"repeat".as_ptr().cast(),
    mod_: &raw mut bindings::__this_module,
    ops: &raw const bindings::param_ops_int,
    perm: 0o444,
    level: -1,
    flags: 0,
    __bindgen_anon_1: bindings::kernel_param__bindgen_ty_1 { arg: (&raw mut REPEAT).cast() },
});

// `#[used(compiler)]`, as the `module!` macro emits its strings: a plain `#[used]`
// static gets SHF_GNU_RETAIN, the linker then keeps it in a second `.modinfo`
// section, and the kernel, which reads only the first, misses `vermagic`.
#[used(compiler)]
#[link_section = ".modinfo"]
pub static PARMTYPE_REPEAT: [u8; 20] = *b"parmtype=repeat:int\0";

#[used(compiler)]
#[link_section = ".modinfo"]
pub static PARM_REPEAT: [u8; 45] = *b"parm=repeat:How many greetings to log (1-10)\0";

struct KmfRust {
    greetings: KVec<i32>,
}

impl kernel::Module for KmfRust {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        // SAFETY: the kernel wrote the parameter before calling init, and nothing writes
        // it afterwards (it is read-only in sysfs).
        let repeat = unsafe { core::ptr::read_volatile(&raw const REPEAT) };
        if !(1..=10).contains(&repeat) {
            pr_err!("repeat={} is out of range 1-10\n", repeat);
            return Err(EINVAL);
        }
        let mut greetings = KVec::new();
        for i in 1..=repeat {
            pr_info!("hello from Rust ({}/{})\n", i, repeat);
            greetings.push(i, GFP_KERNEL)?;
        }
        Ok(KmfRust { greetings })
    }
}

impl Drop for KmfRust {
    fn drop(&mut self) {
        pr_info!("goodbye after {} greetings\n", self.greetings.len());
    }
}
