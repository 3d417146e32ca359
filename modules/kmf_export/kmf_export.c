// SPDX-License-Identifier: GPL-2.0
/*
 * Exports a symbol for another module (kmf_user) to call, the way a driver core
 * exports helpers to its plug-ins. modpost records it in Module.symvers and depmod
 * records kmf_user's dependency on this module in modules.dep.
 */
#include <linux/atomic.h>
#include <linux/init.h>
#include <linux/module.h>

static atomic_t kmf_export_calls = ATOMIC_INIT(0);

/* Returns a + b and counts the calls. */
int kmf_export_add(int a, int b)
{
	atomic_inc(&kmf_export_calls);
	return a + b;
}
EXPORT_SYMBOL_GPL(kmf_export_add);

static int __init kmf_export_init(void)
{
	pr_info("kmf_export: ready\n");
	return 0;
}

static void __exit kmf_export_exit(void)
{
	pr_info("kmf_export: %d calls served\n", atomic_read(&kmf_export_calls));
}

module_init(kmf_export_init);
module_exit(kmf_export_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmodforge example: exports kmf_export_add()");
