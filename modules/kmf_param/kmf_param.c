// SPDX-License-Identifier: GPL-2.0
/*
 * Module parameters, as KMM passes them (`modprobe kmf_param greeting=... repeat=...`).
 * An out-of-range repeat count makes init fail with -EINVAL, as a driver refuses a
 * bad configuration.
 */
#include <linux/init.h>
#include <linux/module.h>
#include <linux/moduleparam.h>

static char *greeting = "hello";
module_param(greeting, charp, 0444);
MODULE_PARM_DESC(greeting, "What to say on load");

static int repeat = 1;
module_param(repeat, int, 0444);
MODULE_PARM_DESC(repeat, "How many times to say it (1-10)");

static int __init kmf_param_init(void)
{
	int i;

	if (repeat < 1 || repeat > 10) {
		pr_err("kmf_param: repeat=%d is out of range 1-10\n", repeat);
		return -EINVAL;
	}
	for (i = 0; i < repeat; i++)
		pr_info("kmf_param: %s (%d/%d)\n", greeting, i + 1, repeat);
	return 0;
}

static void __exit kmf_param_exit(void)
{
	pr_info("kmf_param: goodbye\n");
}

module_init(kmf_param_init);
module_exit(kmf_param_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmodforge example: module parameters");
