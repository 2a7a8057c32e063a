// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * The floor of the overhead benchmark (python -m chadthrottle.bench overhead): cgroup_skb
 * programs that do nothing, attached where ours are, so the kernel's cost of running any
 * program on a packet is measured next to the cost of ours.  Never loaded by the daemon.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("cgroup_skb/ingress")
int floor_ingress(struct __sk_buff *skb)
{
	return 1;
}

SEC("cgroup_skb/egress")
int floor_egress(struct __sk_buff *skb)
{
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
