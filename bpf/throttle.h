/* SPDX-License-Identifier: GPL-2.0-or-later
 *
 * chadthrottle kernel <-> user ABI.  Every struct here has explicit padding and a size
 * assertion; daemon/chadthrottle/abi.py mirrors it with ctypes and a unit test compares
 * the sizes.  No kernel includes: plain fixed-width types only.
 */
#ifndef CHADTHROTTLE_THROTTLE_H
#define CHADTHROTTLE_THROTTLE_H

#ifndef __VMLINUX_H__
#include <linux/types.h>
#endif

/* Directions, used as array index: what the process receives, what it sends. */
#define CT_DIR_DOWNLOAD 0 /* cgroup_skb/ingress */
#define CT_DIR_UPLOAD 1   /* cgroup_skb/egress */
#define CT_DIRS 2

/* Unit (cgroup) limits are looked up by ancestor cgroup id at these levels. */
#define CT_MAX_LEVELS 16

/* Map sizes. */
#define CT_MAX_LIMITS 16384
#define CT_MAX_MEMBERS 65536
#define CT_MAX_UNITS 1024
#define CT_MAX_TRAFFIC 16384

/* One token bucket and its counters.  rate == 0: this direction is not limited (counters
 * still run).  tokens may go negative: a packet is admitted while tokens > 0 and may leave
 * the bucket in debt by at most one packet (a 64 KB GSO segment must not starve a flow). */
struct ct_bucket {
	__u64 rate;            /* bytes per second, 0 = unlimited */
	__u64 burst;           /* bucket depth in bytes */
	__s64 tokens;          /* bytes; may be negative (debt) */
	__u64 last_ns;         /* CLOCK_MONOTONIC of the last refill */
	__u64 passed_bytes;
	__u64 passed_packets;
	__u64 dropped_bytes;
	__u64 dropped_packets;
	__u64 calls;           /* program invocations for packets of this limit */
};

/* Value of the limits (per budget) and unit_limits (per cgroup id) maps. */
struct ct_limit {
#ifdef __VMLINUX_H__
	struct bpf_spin_lock lock;
#else
	__u32 lock;
#endif
	__u32 _pad0;
	struct ct_bucket dir[CT_DIRS];
};

/* Socket-local storage: the process (tgid) that owns the socket, and a cache of its
 * budget, valid while `gen` equals ct_config.member_gen (bumped on every membership
 * change), so the common packet skips the proc_budget lookup. */
struct ct_sk_tag {
	__u32 tgid;
	__u32 budget; /* 0: none */
	__u64 gen;
};

/* Per-process byte counters for every process with tagged traffic (LRU bounded). */
struct ct_traffic {
	__u64 bytes[CT_DIRS];
	__u64 packets[CT_DIRS];
};

/* Runtime configuration written by the daemon (array map, one entry). */
struct ct_config {
	__u64 unit_levels; /* bit L set: some unit limit sits at cgroup level L */
	__u64 member_gen;  /* bumped whenever proc_budget changes (user space, fork, exit) */
};

/* Whole-program counters (per-CPU array, one entry). */
struct ct_global {
	__u64 calls[CT_DIRS];
	__u64 untagged[CT_DIRS]; /* packets whose socket carries no tag */
	__u64 dropped[CT_DIRS];
};

_Static_assert(sizeof(struct ct_bucket) == 72, "ct_bucket ABI");
_Static_assert(sizeof(struct ct_limit) == 152, "ct_limit ABI");
_Static_assert(sizeof(struct ct_sk_tag) == 16, "ct_sk_tag ABI");
_Static_assert(sizeof(struct ct_traffic) == 32, "ct_traffic ABI");
_Static_assert(sizeof(struct ct_config) == 16, "ct_config ABI");
_Static_assert(sizeof(struct ct_global) == 48, "ct_global ABI");

#endif /* CHADTHROTTLE_THROTTLE_H */
