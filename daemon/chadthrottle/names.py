"""Every name the project shares with the outside world, defined once.

D-Bus names, error names, polkit actions, and the ELF names of the BPF maps and
programs.  Everything else imports from here; this module imports nothing of ours.
"""

# --- D-Bus contract (version 1, see dbus/org.chadthrottle.Throttle1.xml) ---
BUS_NAME = "org.chadthrottle.Throttle1"
OBJECT_PATH = "/org/chadthrottle/Throttle1"
INTERFACE = "org.chadthrottle.Throttle1"
ERROR_PREFIX = INTERFACE + ".Error."

ERR_NO_SUCH_PROCESS = ERROR_PREFIX + "NoSuchProcess"
ERR_NO_SUCH_LIMIT = ERROR_PREFIX + "NoSuchLimit"
ERR_NO_SUCH_UNIT = ERROR_PREFIX + "NoSuchUnit"
ERR_INVALID_LIMIT = ERROR_PREFIX + "InvalidLimit"
ERR_NOT_AUTHORIZED = ERROR_PREFIX + "NotAuthorized"
ERR_UNSUPPORTED = ERROR_PREFIX + "Unsupported"
ERR_FAILED = ERROR_PREFIX + "Failed"
ERR_INVALID_RULE = ERROR_PREFIX + "InvalidRule"
ERR_NO_SUCH_RULE = ERROR_PREFIX + "NoSuchRule"

# the bus's standard name for "too many": too many Stats subscriptions of one user
ERR_LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"

# LimitRemoved reasons
REASON_CLEARED = "cleared"
REASON_EXITED = "exited"

# --- polkit actions (dbus/org.chadthrottle.throttle.policy) ---
POLKIT_ACTION_LIMIT_OWN = "org.chadthrottle.throttle.limit-own"
POLKIT_ACTION_LIMIT_ANY = "org.chadthrottle.throttle.limit-any"
POLKIT_ACTION_READ = "org.chadthrottle.throttle.read"
POLKIT_ACTION_MANAGE_RULES = "org.chadthrottle.throttle.manage-rules"

# --- rules (DESIGN.md §2b): the keys of a rule and their D-Bus types in a{sv} ---
RULE_KEY_SIGNATURES: dict[str, str] = {
    "name": "s",
    "exe": "s",
    "comm": "s",
    "cmdline": "s",
    "uid": "u",
    "unit": "s",
    "scope": "s",
    "download": "t",
    "upload": "t",
    "permanent": "b",
    "enabled": "b",
}
#: keys ListRules adds to each rule
RULE_LIST_SIGNATURES: dict[str, str] = {"id": "s", "matched": "u"}
RULE_MATCH_KEYS: tuple[str, ...] = ("exe", "comm", "cmdline", "uid", "unit")
SCOPE_PROCESS = "process"
SCOPE_APPLICATION = "application"

#: every action, in the order GetPermissions reports them
POLKIT_ACTIONS = (POLKIT_ACTION_LIMIT_OWN, POLKIT_ACTION_LIMIT_ANY, POLKIT_ACTION_READ,
                  POLKIT_ACTION_MANAGE_RULES)

# --- GetPermissions values ---
PERMISSION_YES = "yes"
PERMISSION_AUTH = "auth"  # allowed after authentication (a polkit agent asks)
PERMISSION_NO = "no"

# --- Subscribe: the Stats interval is clamped to this range (milliseconds) ---
STATS_INTERVAL_MIN_MS = 250
STATS_INTERVAL_MAX_MS = 10_000

# --- the bus driver and polkit, as the daemon talks to them ---
BUS_DRIVER = "org.freedesktop.DBus"
BUS_DRIVER_PATH = "/org/freedesktop/DBus"
POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"

# --- status values of GetStats "status" ---
STATUS_THROTTLED = "throttled"
STATUS_NOT_WORKING = "not-working"
STATUS_PROGRAM_NOT_CALLED = "program-not-called"
STATUS_NOT_DROPPING = "not-dropping"
STATUS_UNLIMITED = "unlimited"

# --- limits (bytes per second) ---
RATE_MIN = 1024
RATE_MAX = 1 << 40

# --- BPF object: ELF names of maps and programs (bpf/throttle.bpf.c) ---
BPF_OBJECT_FILE = "throttle.bpf.o"
PROG_INGRESS = "ct_ingress"
PROG_EGRESS = "ct_egress"
PROG_SOCK_CREATE = "ct_sock_create"
PROG_SOCK_RELEASE = "ct_sock_release"
PROG_SOCKOPS = "ct_sockops"
PROG_SETSOCKOPT = "ct_setsockopt"
PROG_FORK = "ct_fork"
PROG_EXIT = "ct_exit"
PROG_EXEC = "ct_exec"
PROG_SOCK_SEND = "ct_sock_send"
PROG_SOCK_RECV = "ct_sock_recv"
PROG_CGROUP_ATTACH = "ct_cgroup_attach"
PROG_CGROUP_MKDIR = "ct_cgroup_mkdir"
PROG_CGROUP_RMDIR = "ct_cgroup_rmdir"
PROG_ITER_TASK = "ct_iter_task"
PROG_ITER_FILES = "ct_iter_files"
PROG_ITER_TCP = "ct_iter_tcp"
PROG_ITER_TCP_FILES = "ct_iter_tcp_files"
PROG_ITER_UDP_FILES = "ct_iter_udp_files"
PROG_TC_CLASSIFY = "ct_tc_classify"
MAP_SK_TAG = "sk_tag"
MAP_TASK_BUDGET = "task_budget"
MAP_LIMITS = "limits"
MAP_LIMIT_CFG = "limit_cfg"
MAP_UNIT_LIMITS = "unit_limits"
MAP_UNIT_CFG = "unit_cfg"
MAP_PROC_TRAFFIC = "proc_traffic"
MAP_PEER_PACE = "peer_pace"
MAP_DL_CLASS = "dl_class"
MAP_DL_DEVICES = "dl_devices"
MAP_RULES = "rules"
MAP_EXE_RULES = "exe_rules"
MAP_EXE_DIRS = "exe_dirs"
MAP_WATCH_CGROUPS = "watch_cgroups"
MAP_ACTIVE = "active"
MAP_CHECKS = "checks"
MAP_FILE_SOCKS = "file_socks"
MAP_CONFIG = "ct_config_map"
MAP_GLOBAL_STATS = "global_stats"
MAP_KERNEL_BIDS = "kernel_bids"
MAP_EVENTS = "events"

# --- what the daemon adds to network devices (owned, named, removed on stop) ---
IFB_PREFIX = "ctifb"               # ifb devices: ctifb<ifindex of the uplink>
IFACE_ALIAS = "chadthrottle"       # ip link alias of every device the daemon creates
TC_FILTER_PRIO = 0xC7A7            # preference of our filter on an uplink's ingress
TC_FILTER_HANDLE = 1               # its handle
# libbpf names the filter after its program (PROG_TC_CLASSIFY + ":[<program id>]"); runs
# before libbpf made it named it this (still recognised after a crash)
TC_FILTER_NAME = "chadthrottle"

# --- systemd ---
SYSTEMD_UNIT = "chadthrottled.service"
JOURNAL_FIELD_PREFIX = "CHADTHROTTLE_"

# --- metrics (the opt-in OpenMetrics endpoint; README, section Metrics) ---
# counters carry their exposed name, _total included
METRIC_LIMIT_BYTES = "chadthrottle_limit_bytes_total"
METRIC_LIMIT_PACKETS = "chadthrottle_limit_packets_total"
METRIC_LIMIT_DROPPED_PACKETS = "chadthrottle_limit_dropped_packets_total"
METRIC_LIMIT_DROPPED_BYTES = "chadthrottle_limit_dropped_bytes_total"
METRIC_LIMIT_RATE = "chadthrottle_limit_rate_bytes_per_second"
METRIC_LIMIT_MAX = "chadthrottle_limit_max_bytes_per_second"
METRIC_LIMIT_STATUS = "chadthrottle_limit_status"
METRIC_LIMIT_PROCESSES = "chadthrottle_limit_processes"
METRIC_UNIT_BYTES = "chadthrottle_unit_limit_bytes_total"
METRIC_UNIT_PACKETS = "chadthrottle_unit_limit_packets_total"
METRIC_UNIT_DROPPED_PACKETS = "chadthrottle_unit_limit_dropped_packets_total"
METRIC_UNIT_DROPPED_BYTES = "chadthrottle_unit_limit_dropped_bytes_total"
METRIC_UNIT_RATE = "chadthrottle_unit_limit_rate_bytes_per_second"
METRIC_UNIT_MAX = "chadthrottle_unit_limit_max_bytes_per_second"
METRIC_UNIT_STATUS = "chadthrottle_unit_limit_status"
METRIC_RULE_BYTES = "chadthrottle_rule_bytes_total"
METRIC_RULE_PACKETS = "chadthrottle_rule_packets_total"
METRIC_RULE_DROPPED_PACKETS = "chadthrottle_rule_dropped_packets_total"
METRIC_RULE_DROPPED_BYTES = "chadthrottle_rule_dropped_bytes_total"
METRIC_RULE_RATE = "chadthrottle_rule_rate_bytes_per_second"
METRIC_RULE_MAX = "chadthrottle_rule_max_bytes_per_second"
METRIC_RULE_LIMITS = "chadthrottle_rule_limits"
METRIC_RULE_PROCESSES = "chadthrottle_rule_processes"
METRIC_RULE_INFO = "chadthrottle_rule_info"
METRIC_UNLIMITED_BYTES = "chadthrottle_unlimited_bytes_total"
METRIC_UNLIMITED_PACKETS = "chadthrottle_unlimited_packets_total"
METRIC_UNLIMITED_PROCESSES = "chadthrottle_unlimited_processes"
METRIC_ATTACHED_CGROUPS = "chadthrottle_attached_cgroups"
METRIC_BUDGETS = "chadthrottle_budgets"
METRIC_SUBSCRIBERS = "chadthrottle_subscribers"
METRIC_SAMPLING = "chadthrottle_sampling"
METRIC_SAMPLES = "chadthrottle_samples_total"
METRIC_SAMPLE_DURATION = "chadthrottle_sample_duration_seconds"
METRIC_BUS_CALLS = "chadthrottle_bus_calls_total"
METRIC_MAP_ENTRIES = "chadthrottle_bpf_map_entries"
METRIC_MAP_MAX_ENTRIES = "chadthrottle_bpf_map_max_entries"
METRIC_BPF_PREFIX = "chadthrottle_bpf_"  # + the kernel's global counters (metrics.collector)
METRIC_SNAPSHOT_DURATION = "chadthrottle_metrics_snapshot_duration_seconds"
METRIC_BUILD_INFO = "chadthrottle_build_info"
