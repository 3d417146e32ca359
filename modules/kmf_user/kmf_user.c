// SPDX-License-Identifier: GPL-2.0
/* Calls kmf_export_add(), exported by kmf_export: loading this loads that first. */
#include <linux/init.h>
#include <linux/module.h>

int kmf_export_add(int a, int b);

static int __init kmf_user_init(void)
{
	int sum = kmf_export_add(40, 2);

	if (sum != 42)
		return -EINVAL;
	pr_info("kmf_user: kmf_export_add(40, 2) = %d\n", sum);
	return 0;
}

static void __exit kmf_user_exit(void)
{
	pr_info("kmf_user: goodbye\n");
}

module_init(kmf_user_init);
module_exit(kmf_user_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmodforge example: uses a symbol exported by kmf_export");
