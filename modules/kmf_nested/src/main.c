// SPDX-License-Identifier: GPL-2.0
/* A module made of two objects in a subfolder, built by its own Makefile. */
#include <linux/init.h>
#include <linux/module.h>
#include "counter.h"

static int __init kmf_nested_init(void)
{
	pr_info("kmf_nested: loaded (count %d)\n", kmf_nested_count());
	return 0;
}

static void __exit kmf_nested_exit(void)
{
	pr_info("kmf_nested: goodbye (count %d)\n", kmf_nested_count());
}

module_init(kmf_nested_init);
module_exit(kmf_nested_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmodforge example: multi-object module with a DKMS-style Makefile");
