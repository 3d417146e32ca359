// SPDX-License-Identifier: GPL-2.0
/*
 * kmf_fw: asks the kernel's firmware loader for kmf_fw/hello.bin when it loads, as a
 * driver asks for its device's firmware, and refuses to load without it (-ENOENT) or
 * with a file that is not its own (-EINVAL). The file ships in the kmod image through
 * module.toml's [firmware] dir; KMM's worker puts it where the loader looks.
 */
#include <linux/err.h>
#include <linux/firmware.h>
#include <linux/init.h>
#include <linux/module.h>
#include <linux/platform_device.h>
#include <linux/string.h>

#define KMF_FW_NAME "kmf_fw/hello.bin"

static const char kmf_fw_magic[] = "kmodforge firmware: ";

static struct platform_device *kmf_fw_pdev;

/* The firmware's text after the magic, without its newline: what init prints. */
static int kmf_fw_check(const struct firmware *fw)
{
	size_t magic = sizeof(kmf_fw_magic) - 1;
	size_t len;

	if (fw->size < magic || memcmp(fw->data, kmf_fw_magic, magic)) {
		pr_err("kmf_fw: %s is not kmf_fw's firmware (%zu bytes)\n",
		       KMF_FW_NAME, fw->size);
		return -EINVAL;
	}
	len = min_t(size_t, fw->size - magic, 64);
	while (len && (fw->data[magic + len - 1] == '\n'))
		len--;
	pr_info("kmf_fw: firmware %s (%zu bytes) says \"%.*s\"\n", KMF_FW_NAME,
		fw->size, (int)len, (const char *)fw->data + magic);
	return 0;
}

static int __init kmf_fw_init(void)
{
	const struct firmware *fw;
	int ret;

	/* request_firmware() needs a device: a bare platform device is enough. */
	kmf_fw_pdev = platform_device_register_simple("kmf_fw", PLATFORM_DEVID_NONE,
						      NULL, 0);
	if (IS_ERR(kmf_fw_pdev))
		return PTR_ERR(kmf_fw_pdev);

	ret = request_firmware(&fw, KMF_FW_NAME, &kmf_fw_pdev->dev);
	if (ret) {
		pr_err("kmf_fw: cannot load firmware %s (error %d)\n", KMF_FW_NAME, ret);
		platform_device_unregister(kmf_fw_pdev);
		return -ENOENT;
	}
	ret = kmf_fw_check(fw);
	release_firmware(fw);
	if (ret)
		platform_device_unregister(kmf_fw_pdev);
	return ret;
}

static void __exit kmf_fw_exit(void)
{
	platform_device_unregister(kmf_fw_pdev);
	pr_info("kmf_fw: unloaded\n");
}

module_init(kmf_fw_init);
module_exit(kmf_fw_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmodforge example: requests its firmware (kmf_fw/hello.bin) at load");
MODULE_FIRMWARE(KMF_FW_NAME);
