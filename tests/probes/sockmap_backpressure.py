#!/usr/bin/env python3
"""Does this kernel hold back a sender whose sockmap-redirected bytes nobody reads?

Why ambit joins same-node connections in the agent rather than in the kernel: it loads the two
redirects a kernel splice would use, by hand (a few instructions, no compiler), between two
loopback TCP connections, floods the redirected side for a few seconds while the receiving
application reads nothing, and prints how much the kernel took and where it kept it.

  sk_msg  ingress redirect (the sender's sendmsg queues straight onto the peer socket)
  sk_skb  egress  redirect (a received segment is sent out of the peer socket by a kworker)

A mesh can only splice safely when the sender stalls at about a socket buffer, as TCP does.
Run as root: `python3 tests/probes/sockmap_backpressure.py [seconds]`. Nothing is pinned; the
maps and programs go away with the process.
"""
import ctypes
import os
import socket
import struct
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
SYS_BPF = 321  # x86_64
MAP_CREATE, MAP_UPDATE, PROG_LOAD, PROG_ATTACH = 0, 2, 5, 8
MAP_SOCKMAP = 15
PROG_SK_SKB, PROG_SK_MSG = 14, 16
ATTACH_SK_MSG_VERDICT, ATTACH_SK_SKB_VERDICT = 7, 38
HELPER_SK_REDIRECT_MAP, HELPER_MSG_REDIRECT_MAP = 52, 60
F_INGRESS = 1


def insn(code, dst, src, off, imm):
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def redirect_program(prog_type, helper, flags, map_fd):
    """r0 = helper(ctx, map, key 1, flags); exit."""
    code = b"".join([
        insn(0x18, 2, 1, 0, map_fd), insn(0, 0, 0, 0, 0),  # r2 = the map (ld_imm64, pseudo fd)
        insn(0xB7, 3, 0, 0, 1),  # r3 = key 1
        insn(0xB7, 4, 0, 0, flags),  # r4 = flags
        insn(0x85, 0, 0, 0, helper),  # call
        insn(0x95, 0, 0, 0, 0),  # exit
    ])
    insns, licence = ctypes.create_string_buffer(code), ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    attr = struct.pack("IIQQIIQ", prog_type, len(code) // 8, ctypes.addressof(insns),
                       ctypes.addressof(licence), 1, len(log), ctypes.addressof(log))
    fd = libc.syscall(SYS_BPF, PROG_LOAD, ctypes.create_string_buffer(attr, 128), len(attr))
    if fd < 0:
        sys.exit(f"loading the program failed: {os.strerror(ctypes.get_errno())}\n{log.value.decode()}")
    return fd


def connected_pair():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def put(map_fd, key, sock):
    k, v = ctypes.c_uint32(key), ctypes.c_uint32(sock.fileno())
    attr = struct.pack("IIQQQ", map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0)
    if libc.syscall(SYS_BPF, MAP_UPDATE, ctypes.create_string_buffer(attr, 128), len(attr)) < 0:
        sys.exit(f"adding a socket to the sockmap failed: {os.strerror(ctypes.get_errno())}")


def tcp_pages():
    for line in open("/proc/net/sockstat"):
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1])
    return 0


def available_kib():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def probe(name, seconds):
    attr = struct.pack("IIII", MAP_SOCKMAP, 4, 4, 2)
    map_fd = libc.syscall(SYS_BPF, MAP_CREATE, ctypes.create_string_buffer(attr, 128), len(attr))
    if map_fd < 0:
        sys.exit(f"creating a sockmap failed: {os.strerror(ctypes.get_errno())}")
    # app_a -> agent_a is the leg the sender writes on; agent_b -> app_b the leg nobody reads.
    app_a, agent_a = connected_pair()
    agent_b, app_b = connected_pair()
    prog = None
    if name == "tcp":
        # The control, no redirect: app_a's bytes stay on its own connection, whose reader
        # (agent_a) reads nothing either.
        first = second = None
        app_b = agent_a
    elif name == "sk_msg":
        prog = redirect_program(PROG_SK_MSG, HELPER_MSG_REDIRECT_MAP, F_INGRESS, map_fd)
        attach, first, second = ATTACH_SK_MSG_VERDICT, app_a, app_b
    else:
        prog = redirect_program(PROG_SK_SKB, HELPER_SK_REDIRECT_MAP, 0, map_fd)
        attach, first, second = ATTACH_SK_SKB_VERDICT, agent_a, agent_b
    if prog is not None:
        attr = struct.pack("IIII", map_fd, prog, attach, 0)
        if libc.syscall(SYS_BPF, PROG_ATTACH, ctypes.create_string_buffer(attr, 128), len(attr)) < 0:
            sys.exit(f"attaching the {name} program failed: {os.strerror(ctypes.get_errno())}")
        put(map_fd, 0, first)
        put(map_fd, 1, second)
    # The redirect is live: the byte arrives at app_b, not at agent_a.
    app_a.sendall(b"x")
    app_b.settimeout(2)
    assert app_b.recv(1) == b"x", "the redirect did not deliver"
    pages, avail = tcp_pages(), available_kib()
    app_a.setblocking(False)
    sent, error, chunk, start = 0, None, b"x" * 65536, time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            sent += app_a.send(chunk)
        except BlockingIOError:
            time.sleep(0.001)  # what a sender meets under TCP's backpressure
        except OSError as e:
            error = e.strerror
            break
    held_tcp = (tcp_pages() - pages) * 4 // 1024
    held_total = (avail - available_kib()) // 1024
    print(f"{name:6}: the sender wrote {sent >> 20} MiB into a socket nobody reads in "
          f"{time.monotonic() - start:.1f} s; TCP memory {held_tcp:+d} MiB, node memory {-held_total:+d} MiB"
          + (f"; then the send failed: {error}" if error else ""))
    for s in (app_a, agent_a, agent_b, app_b):
        s.close()
    if prog is not None:
        os.close(prog)
    os.close(map_fd)


if __name__ == "__main__":
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 2
    print(f"kernel {os.uname().release}; a TCP sender would stop at its socket buffers "
          f"(a few MiB)")
    probe("tcp", secs)
    probe("sk_msg", secs)
    time.sleep(1)
    time.sleep(1)
    probe("sk_skb", secs)
