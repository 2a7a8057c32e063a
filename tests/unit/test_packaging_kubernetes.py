"""packaging/kubernetes/chadthrottled-daemonset.yaml (issue 11): no cluster here, so the
example is checked for what can be checked without one — it parses, it holds the objects
and the privileges the README lists, its settings and rule pass the daemon's own
validation, and its metrics address, port and probes agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chadthrottle import config, names, paths
from chadthrottle.rules.model import Rule

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "packaging" / "kubernetes" / "chadthrottled-daemonset.yaml"
DROP_IN = ROOT / "packaging" / "chadthrottled-metrics.conf"


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    loaded = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    by_kind = {d["kind"]: d for d in loaded}
    assert len(by_kind) == len(loaded), "one object of each kind"
    return by_kind


def container(docs) -> dict:
    [c] = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    return c


def test_the_objects(docs) -> None:
    assert set(docs) == {"Namespace", "ConfigMap", "DaemonSet"}
    ds = docs["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    ns = docs["Namespace"]["metadata"]["name"]
    assert docs["ConfigMap"]["metadata"]["namespace"] == ds["metadata"]["namespace"] == ns
    assert ds["spec"]["selector"]["matchLabels"].items() <= \
        ds["spec"]["template"]["metadata"]["labels"].items()


def test_the_privileges_spelled_out(docs) -> None:
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and pod["hostNetwork"] is True
    assert pod["automountServiceAccountToken"] is False
    sc = container(docs)["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == {"BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE",
                                              "SYS_ADMIN", "SYS_RESOURCE"}
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["runAsUser"] == 0 and sc["readOnlyRootFilesystem"] is True
    text = MANIFEST.read_text()
    for cap in sc["capabilities"]["add"]:  # each one explained where it is granted
        line = next(i for i, x in enumerate(text.splitlines()) if x.strip() == f"- {cap}")
        assert text.splitlines()[line - 1].strip().startswith("#"), cap


def test_the_mounts(docs) -> None:
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container(docs)["volumeMounts"]}
    host = {path: volumes[m["name"]]["hostPath"]["path"] for path, m in mounts.items()
            if "hostPath" in volumes[m["name"]]}
    assert host == {"/host/sys/fs/cgroup": "/sys/fs/cgroup", "/sys/kernel/btf":
                    "/sys/kernel/btf", "/run/dbus": "/run/dbus",
                    "/run/chadthrottle": paths.DEFAULT_STATE_DIR}
    assert mounts["/host/sys/fs/cgroup"]["readOnly"] and mounts["/sys/kernel/btf"]["readOnly"]
    assert mounts[paths.DEFAULT_CONFIG_DIR]["readOnly"]
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert env["CHADTHROTTLE_CONFIG_DIR"] == paths.DEFAULT_CONFIG_DIR
    assert env["CHADTHROTTLE_STATE_DIR"] == "/run/chadthrottle"
    assert "--cgroup-root=/host/sys/fs/cgroup" in container(docs)["args"]
    [init] = pod["initContainers"]
    policy = f"{names.BUS_NAME}.conf"
    assert init["command"][-1] == f"/host/etc/dbus-1/system.d/{policy}"
    assert (ROOT / "dbus" / policy).is_file()


def test_the_settings_and_rules_pass_the_daemons_validation(docs) -> None:
    data = docs["ConfigMap"]["data"]
    settings = config.from_toml(data[paths.SETTINGS_FILE], "ConfigMap " + paths.SETTINGS_FILE)
    assert settings.monitor_all is True
    items = {i["key"]: i["path"] for v in docs["DaemonSet"]["spec"]["template"]["spec"]
             ["volumes"] if "configMap" in v for i in v["configMap"]["items"]}
    assert items[paths.SETTINGS_FILE] == paths.SETTINGS_FILE
    rules = {k: p for k, p in items.items() if p.startswith(paths.RULES_SUBDIR + "/")}
    assert rules, "the example carries a rule"
    for key, path in rules.items():
        rule_id = Path(path).stem
        rule = Rule.from_toml(data[key], rule_id, path)
        assert rule.permanent and rule.id == rule_id


def test_metrics_address_port_and_probes_agree(docs) -> None:
    c = container(docs)
    [listen] = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--metrics-listen=")]
    address = config.parse_listen(listen.replace("$(NODE_IP)", "10.1.2.3"))
    assert address == config.ListenAddress("10.1.2.3", 9917)
    [port] = c["ports"]
    assert port["containerPort"] == address.port
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": address.port}
    notes = docs["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/port"] == str(address.port)
    assert c["command"][:3] == ["nsenter", "--target=1", "--cgroup"]


def test_the_systemd_drop_in_adds_ip_sockets() -> None:
    lines = [x.strip() for x in DROP_IN.read_text().splitlines()
             if x.strip() and not x.startswith("#")]
    assert lines == ["[Service]", "RestrictAddressFamilies=AF_INET AF_INET6"]
