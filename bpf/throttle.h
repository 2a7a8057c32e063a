/* SPDX-License-Identifier: GPL-2.0-or-later
 *
 * chadthrottle kernel <-> user ABI.  Every struct here has explicit padding and a size
 * assertion; daemon/chadthrottle/abi.py mirrors it with ctypes and a unit test compares
 * the sizes, the field order and the constants.  No kernel includes: plain fixed-width
 * types only.
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
#define CT_MAX_LIMITS 16384  /* budgets (SetLimit, rule budgets) */
#define CT_MAX_UNITS 1024    /* unit (cgroup) limits */
#define CT_MAX_TRAFFIC 16384 /* per-process counters (LRU) */
#define CT_MAX_PEERS 16384   /* limited TCP connections whose local sender may be paced */
#define CT_MAX_RULES 64      /* rule slots the exec matcher tries, in precedence order */
#define CT_MAX_EXE 8192      /* (file, rule slot) pairs of exe rules */
#define CT_MAX_WATCH 4096    /* cgroups and directories watched for events */
#define CT_MAX_CLASSES 16384 /* budgets and units with a download queue class */
#define CT_MAX_CHECKS 64     /* budgets cross-checked per socket census */
#define CT_MAX_FILE_SOCKS 65536 /* sockets found in files per tagging pass */
#define CT_MAX_ACTIVE 4096   /* budgets with traffic between two samples */
#define CT_MAX_DEVICES 256   /* devices a limited download arrived on */
#define CT_EVENTS_BYTES (256 * 1024)

/* Budget ids are 64-bit and never reused: the daemon counts up from 1, the kernel (budgets
 * of scope=process rules) from CT_KERNEL_BID.  Neither range can wrap or meet the other. */
#define CT_KERNEL_BID (1ULL << 62)
/* ct_task.state: the budget id, and this bit once the process is counted in the budget's
 * `members` (exactly one of exit and undo clears it: both use an atomic exchange). */
#define CT_COUNTED (1ULL << 63)
#define CT_BID_MASK (CT_COUNTED - 1)

/* Activity epochs: sockets that moved data in the last epoch share a budget's rate. */
#define CT_EPOCH_NS 100000000ULL /* 100 ms */
#define CT_QUEUE_GRACE_NS 500000000ULL /* a new device's downloads pass while its queue is made */

/* Per-process counters are added up in the socket's tag and moved to proc_traffic every
 * CT_FLUSH_PACKETS packets (and when the socket closes): one hash update per 16 packets. */
#define CT_FLUSH_PACKETS 16

/* One token bucket, its counters, and its socket activity (the pacing divisor).  rate == 0:
 * this direction is not limited (counters still run).  tokens may go negative: a packet is
 * admitted while tokens > -slack (the unpaced first segments of a TCP connection and the
 * pacer's timer jitter fit in the slack); debt is paid back at the rate, never forgiven. */
struct ct_bucket {
	__u64 rate;            /* bytes (payload) per second, 0 = unlimited */
	__u64 burst;           /* bucket depth in bytes */
	__u64 slack;           /* debt in bytes a packet may still be admitted at */
	__s64 tokens;          /* bytes; may be negative (debt) */
	__u64 last_ns;         /* CLOCK_MONOTONIC of the last refill */
	__u64 passed_bytes;
	__u64 passed_packets;
	__u64 dropped_bytes;
	__u64 dropped_packets;
	__u64 calls;           /* program invocations for packets of this limit */
	__u64 epoch;           /* current activity epoch (ns / CT_EPOCH_NS) */
	__u32 active;          /* sockets that moved data in the previous epoch */
	__u32 counting;        /* sockets seen so far in the current epoch */
};

/* Value of the limits (per budget) and unit_limits (per cgroup id) maps.  After creation the
 * kernel owns every field: the daemon never rewrites a value (that would lose concurrent
 * counter updates); it changes rates through limit_cfg/unit_cfg and bumps
 * ct_config.cfg_gen, and the next packet copies the new settings in under the lock. */
struct ct_limit {
#ifdef __VMLINUX_H__
	struct bpf_spin_lock lock;
#else
	__u32 lock;
#endif
	__u32 flags;           /* CT_LIMIT_* */
	struct ct_bucket dir[CT_DIRS];
	__s64 members;         /* live member processes (atomic) */
	__u64 cfg_gen;         /* ct_config.cfg_gen the settings were copied at */
	__u64 set_gen;         /* ct_limit_cfg.gen of the settings in force */
	__u32 root_tgid;       /* the process the budget was made for (0: none) */
	__u32 mss;             /* TCP_MAXSEG for its new connections (0: leave alone) */
	__u32 rule;            /* rule slot + 1 that made it (0: SetLimit / unit limit) */
	__u32 _pad0;
	__u64 seen_gen;        /* ct_config.sample_gen when last reported in `active` */
};

#define CT_LIMIT_CLASS_ASKED 0x1 /* a download class was asked for (once) */

/* The settings the daemon writes (limit_cfg per budget, unit_cfg per cgroup id). */
struct ct_limit_cfg {
	__u64 rate[CT_DIRS];
	__u64 burst[CT_DIRS];
	__u64 slack[CT_DIRS];
	__u64 gen;             /* bumped on every change */
	__u32 mss;
	__u32 _pad0;
};

/* Task-local storage of a process (its thread-group leader): the budget it belongs to.
 * Storage lives and dies with the task, so a pid reused later never inherits it. */
struct ct_task {
	__u64 state;           /* budget id | CT_COUNTED */
	__u32 flags;           /* CT_TASK_* */
	__u32 rule;            /* rule slot + 1 that enrolled it (0: none) */
};

#define CT_TASK_EXPLICIT 0x1 /* enrolled by SetLimit (or inherited from such a process) */
#define CT_TASK_ROOT 0x2     /* the process a budget was made or matched for */

/* Socket-local storage. */
struct ct_sk_tag {
	__u64 budget;          /* budget of the owner (0: none) */
	__u64 peer_budget;     /* the local sender of a limited socket of this budget */
	__u64 unit;            /* innermost limited unit (cgroup id) at creation/tagging */
	__u64 seen[CT_DIRS];   /* last activity epoch counted, per direction */
	__u32 tgid;            /* owner: the creator, or the last limited process using it */
	__u32 flags;           /* CT_SK_* */
	__u32 paced;           /* SO_MAX_PACING_RATE last applied (0: never) */
	__u32 clamp;           /* TCP_WINDOW_CLAMP last applied (0: never) */
	__u32 cwnd;            /* TCP_BPF_SNDCWND_CLAMP last applied (0: never) */
	__u32 rx;              /* packets received since the window bound was put back */
	__u64 pend_bytes[CT_DIRS]; /* not yet added to the owner's proc_traffic (batched) */
	__u32 pend_pkts[CT_DIRS];
};

#define CT_SK_CB 0x1       /* sock_ops callbacks (RTT, STATE) are on */
#define CT_SK_PEER_REG 0x2 /* registered in peer_pace (delete at close) */

/* peer_pace key: a TCP connection seen from its sender's side (local = the sender). */
struct ct_peer_key {
	__u32 family;
	__u32 ports;           /* local port << 16 | remote port (host order) */
	__u32 local[4];
	__u32 remote[4];
};

/* Per-process byte counters for every process with tagged traffic (LRU bounded). */
struct ct_traffic {
	__u64 bytes[CT_DIRS];
	__u64 packets[CT_DIRS];
};

/* What an iterator run should do (ct_config.iter_op). */
#define CT_ITER_ENROLL 1   /* task: put root_tgid and its descendants in iter_budget */
#define CT_ITER_RELEASE 2  /* task: take every member of iter_budget out */
#define CT_ITER_CENSUS 3   /* task: print the members of iter_budget */
#define CT_ITER_TAG 4      /* task_file: tag the sockets of members of budgets */
#define CT_ITER_CHECK 5    /* task_file: sum TCP counters of budgets in `checks` */
#define CT_ITER_UNIT 6     /* task_file: set tag->unit of sockets below iter_budget (a cgroup id) */
#define CT_ITER_SELF 7     /* task: print a ct_self_rec of the visited task (the daemon itself) */
#define CT_ITER_ORPHANS 8  /* tcp: release sockets an earlier daemon paced (its tags died with it) */
#define CT_ITER_SOCKS 9    /* tcp, udp: tag the sockets task_file put in file_socks */

/* A socket a task_file iterator found, keyed by its inode number in file_socks: what its tag
 * becomes once an iterator over the sockets visits it.  task_file reaches a socket only as an
 * untrusted pointer on newer kernels (socket->sk walked from a plain pointer), which socket
 * storage refuses; iter/tcp and iter/udp hand out sockets it accepts. */
struct ct_file_sock {
	__u64 id;              /* CT_ITER_TAG: budget (0: none); CT_ITER_UNIT: cgroup id */
	__u64 leaving;         /* CT_ITER_TAG with id 0: the budget the socket leaves */
	__u32 tgid;            /* the process whose file it is */
	__u32 op;              /* CT_ITER_TAG or CT_ITER_UNIT */
};

/* Runtime configuration written by the daemon (array map, one entry; the daemon is its only
 * writer: the kernel's own counter of budget ids lives in the map kernel_bids). */
struct ct_config {
	__u64 unit_levels;     /* bit L set: some unit limit sits at cgroup level L */
	__u64 cfg_gen;         /* bumped whenever limit_cfg or unit_cfg changes */
	__u64 iter_budget;     /* iterator argument */
	__u32 iter_op;         /* CT_ITER_* */
	__u32 iter_tgid;       /* iterator argument */
	__u32 daemon_tgid;     /* never retag sockets to the daemon */
	__u32 nrules;          /* rule slots in use (0..CT_MAX_RULES) */
	__u32 flags;           /* CT_CFG_* */
	__u32 iter_arg;        /* iterator argument (enroll: ct_task flags | rule slot + 1 << 8) */
	__u64 sample_gen;      /* bumped by every sample: budgets with traffic report once */
	__u32 pid_level;       /* the daemon's pid namespace level: every pid the kernel
				* reports or stores is the one the daemon sees (0 on a host) */
	__u32 _pad1;
};

#define CT_CFG_BUDGETS 0x1     /* some budget exists: socket use is watched */
#define CT_CFG_EXEC_DIRS 0x2   /* exe rules watch directories: report unknown files there */
#define CT_CFG_PEERS 0x4       /* pace local senders of limited connections */
#define CT_CFG_QUEUES 0x8      /* download queues are made: a new device gets its grace */

/* Whole-program counters (per-CPU array, one entry). */
struct ct_global {
	__u64 untagged[CT_DIRS];  /* packets whose socket carries no tag */
	__u64 dropped[CT_DIRS];
	__u64 paced;              /* SO_MAX_PACING_RATE updates */
	__u64 retagged;           /* sockets charged to a new user */
	__u64 full;               /* a map was full (enrollment or budget failed) */
	__u64 events_lost;        /* ring buffer full */
	__u64 queue_grace;        /* over-limit downloads passed while their queue was made */
};

/* A device limited downloads arrived on (map dl_devices, by ifindex). */
#define CT_DEV_PENDING 0  /* reported; its queue is being made */
#define CT_DEV_QUEUED 1   /* its queue holds limited downloads */
#define CT_DEV_REFUSED 2  /* no queue (someone else's ingress qdisc): the bucket holds them */
struct ct_device {
	__u64 seen_ns;  /* first limited download (bpf_ktime_get_ns) */
	__u32 state;    /* CT_DEV_* */
	__u32 ifb;      /* ifindex of its queue's ifb (written with CT_DEV_QUEUED; 0: none) */
};

/* A rule slot of the exec matcher (array map `rules`, CT_MAX_RULES entries). */
struct ct_rule {
	__u32 flags;           /* CT_RULE_* */
	__u32 uid;
	__u64 unit;            /* cgroup id (CT_RULE_UNIT) */
	__u64 app_budget;      /* scope=application: the shared budget */
	__u32 unit_level;
	__u32 mss;
	__u64 rate[CT_DIRS];   /* scope=process: settings of each new budget */
	__u64 burst[CT_DIRS];
	__u64 slack[CT_DIRS];
	char comm[16];
};

#define CT_RULE_ACTIVE 0x1
#define CT_RULE_EXE 0x2     /* the file must be in exe_rules for this slot */
#define CT_RULE_COMM 0x4
#define CT_RULE_UID 0x8
#define CT_RULE_UNIT 0x10
#define CT_RULE_USER 0x20   /* needs user space (command line): report matching execs */
#define CT_RULE_APP 0x40    /* scope=application */

struct ct_exe_key {
	__u64 ino;
	__u32 dev;
	__u32 slot;
};

struct ct_dir_key {
	__u64 ino;
	__u32 dev;
	__u32 _pad0;
};

/* Events to the daemon (ring buffer). */
#define CT_EV_EMPTY 1      /* budget has no live member left */
#define CT_EV_ROOT_EXIT 2  /* the root of a budget exited while members remain */
#define CT_EV_EXEC 3       /* an exec user space must match (tgid, rule slot + 1 or 0) */
#define CT_EV_RULE 4       /* the kernel enrolled tgid in budget for rule slot */
#define CT_EV_CLASS 5      /* a download class is needed for budget (or unit: a = 1) */
#define CT_EV_CGROUP_RMDIR 6 /* a = cgroup id */
#define CT_EV_CGROUP_MKDIR 7 /* a = cgroup id, b = parent id */
#define CT_EV_RETAG 8      /* a socket is now charged to tgid/budget: re-pace */
#define CT_EV_FULL 9       /* a = which map (CT_FULL_*) */
#define CT_EV_CGROUP_MOVE 10 /* tgid (a member) moved to cgroup a */
#define CT_EV_PEER 11      /* a limited passive connection: its established peer needs pacing */
#define CT_EV_DEVICE 12    /* a limited download arrived on device a (ifindex): queue there */

#define CT_FULL_LIMITS 1
#define CT_FULL_TASKS 2
#define CT_FULL_PEERS 3
#define CT_FULL_TRAFFIC 4

struct ct_event {
	__u32 type;
	__u32 tgid;
	__u64 budget;
	__u64 a;
	__u64 b;
	__u32 rule;            /* rule slot + 1 */
	__u32 _pad0;
	char comm[16];
};

/* One record of the census and check iterators (bpf_seq_write). */
struct ct_member_rec {
	__u32 tgid;
	__u32 flags;           /* ct_task.flags */
	__u64 budget;
};

/* The daemon's own place, seen from the kernel (CT_ITER_SELF). */
struct ct_self_rec {
	__u32 pid_level;       /* level of its pid namespace (0: the initial one) */
	__u32 cgroup_level;    /* level, in the whole hierarchy, of its cgroup namespace's root */
};

struct ct_check {
	__u64 received;        /* TCP bytes_received of the budget's sockets */
	__u64 acked;           /* TCP bytes_acked */
	__u64 sockets;
};

_Static_assert(sizeof(struct ct_bucket) == 96, "ct_bucket ABI");
_Static_assert(sizeof(struct ct_limit) == 248, "ct_limit ABI");
_Static_assert(sizeof(struct ct_limit_cfg) == 64, "ct_limit_cfg ABI");
_Static_assert(sizeof(struct ct_task) == 16, "ct_task ABI");
_Static_assert(sizeof(struct ct_sk_tag) == 88, "ct_sk_tag ABI");
_Static_assert(sizeof(struct ct_peer_key) == 40, "ct_peer_key ABI");
_Static_assert(sizeof(struct ct_traffic) == 32, "ct_traffic ABI");
_Static_assert(sizeof(struct ct_config) == 64, "ct_config ABI");
_Static_assert(sizeof(struct ct_global) == 72, "ct_global ABI");
_Static_assert(sizeof(struct ct_device) == 16, "ct_device ABI");
_Static_assert(sizeof(struct ct_rule) == 96, "ct_rule ABI");
_Static_assert(sizeof(struct ct_exe_key) == 16, "ct_exe_key ABI");
_Static_assert(sizeof(struct ct_dir_key) == 16, "ct_dir_key ABI");
_Static_assert(sizeof(struct ct_event) == 56, "ct_event ABI");
_Static_assert(sizeof(struct ct_member_rec) == 16, "ct_member_rec ABI");
_Static_assert(sizeof(struct ct_check) == 24, "ct_check ABI");
_Static_assert(sizeof(struct ct_file_sock) == 24, "ct_file_sock ABI");
_Static_assert(sizeof(struct ct_self_rec) == 8, "ct_self_rec ABI");

#endif /* CHADTHROTTLE_THROTTLE_H */
