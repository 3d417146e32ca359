// SPDX-License-Identifier: GPL-2.0
/*
 * kmf_crc: calls crc7_be(), exported by the kernel's own crc7 module (Debian builds
 * lib/crc7 as a module, not into vmlinux). On a node, KMM's worker loads crc7 first
 * from the node's /lib/modules through the image's host link.
 */
#include <linux/crc7.h>
#include <linux/init.h>
#include <linux/module.h>

static const u8 kmf_crc_data[] = "kmodforge";

static int __init kmf_crc_init(void)
{
	pr_info("kmf_crc: crc7_be(\"kmodforge\") = 0x%02x\n",
		crc7_be(0, kmf_crc_data, sizeof(kmf_crc_data) - 1));
	return 0;
}

static void __exit kmf_crc_exit(void)
{
	pr_info("kmf_crc: unloaded\n");
}

module_init(kmf_crc_init);
module_exit(kmf_crc_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmodforge example: uses an in-tree module's export (crc7_be)");
