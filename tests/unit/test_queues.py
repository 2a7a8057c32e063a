"""The download queues' pure parts: the tc commands of a class, what is recognised as ours
after a crash, and the kernels whose ifb accepts what bpf_redirect hands it."""

from chadthrottle import names
from chadthrottle.shaping import queues
from chadthrottle.shaping.queues import Queues, _Uplink


def test_class_commands_are_hex_classids_bytes_per_second_and_a_fifo_once():
    up = _Uplink(index=7, name="eth0", mtu=1500, ifb=9, own_clsact=True)
    cmds = Queues._class_commands(up, 0x1A, 2 * 1024 * 1024)
    assert cmds[0].startswith("class replace dev ctifb7 parent 1: classid 1:1a htb rate ")
    rate = int(cmds[0].split(" rate ")[1].split("bps")[0])
    assert 2 * 1024 * 1024 < rate < 2.1 * 1024 * 1024  # payload + headers, in bytes/s
    assert cmds[0].endswith(f"ceil {rate}bps")
    # half a second of the rate, in MTU-sized packets
    assert cmds[1] == "qdisc replace dev ctifb7 parent 1:1a handle 1a: pfifo limit 693"
    up.classes.add(0x1A)
    assert len(Queues._class_commands(up, 0x1A, 1024)) == 1  # a new rate keeps its FIFO


def test_our_ifb_is_named_aliased_and_an_ifb():
    link = {"ifname": "ctifb3", "ifalias": names.IFACE_ALIAS, "linkinfo": {"info_kind": "ifb"}}
    assert queues._is_our_ifb(link)
    assert not queues._is_our_ifb({**link, "ifalias": None})
    assert not queues._is_our_ifb({**link, "ifname": "ifb0"})
    assert not queues._is_our_ifb({**link, "linkinfo": {"info_kind": "veth"}})


def test_our_filter_is_handle_preference_and_program_name():
    f = {"kind": "bpf", "pref": names.TC_FILTER_PRIO,
         "options": {"handle": "0x1", "bpf_name": f"{names.PROG_TC_CLASSIFY}:[42]"}}
    assert queues._is_our_filter(f)
    assert queues._is_our_filter({**f, "options": {"handle": "0x1", "bpf_name": "chadthrottle"}})
    assert not queues._is_our_filter({**f, "pref": 1})
    assert not queues._is_our_filter({**f, "options": {**f["options"], "handle": "0x2"}})
    assert not queues._is_our_filter({**f, "options": {**f["options"], "bpf_name": "other"}})
    assert not queues._is_our_filter({"kind": "bpf", "pref": names.TC_FILTER_PRIO})


def test_bpf_redirect_into_an_ifb_needs_linux_6_4():
    assert queues._kernel_redirects_to_ifb("6.18.44-fc-v669")
    assert queues._kernel_redirects_to_ifb("6.4.0")
    assert queues._kernel_redirects_to_ifb("7.0-rc1")
    assert not queues._kernel_redirects_to_ifb("6.1.0-28-amd64")
    assert not queues._kernel_redirects_to_ifb("5.15.0-91-generic")
