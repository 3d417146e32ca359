// SPDX-License-Identifier: GPL-2.0
/* The smallest useful module: says hello on load and goodbye on unload. */
#include <linux/init.h>
#include <linux/module.h>

static int __init kmf_hello_init(void)
{
	pr_info("kmf_hello: hello from kmodforge\n");
	return 0;
}

static void __exit kmf_hello_exit(void)
{
	pr_info("kmf_hello: goodbye\n");
}

module_init(kmf_hello_init);
module_exit(kmf_hello_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmodforge example: minimal module");
