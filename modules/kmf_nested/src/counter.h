/* SPDX-License-Identifier: GPL-2.0 */
#ifndef KMF_NESTED_COUNTER_H
#define KMF_NESTED_COUNTER_H

int kmf_nested_count(void);

#endif
