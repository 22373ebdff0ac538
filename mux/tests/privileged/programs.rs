//! The eBPF programs on their own: loaded through `KernelPrograms`, watched
//! acting on hand-made loopback connections.

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::OwnedFd,
    thread,
    time::{Duration, Instant},
};

use mux::ebpf::{
    EbpfError, Flow, KernelPrograms, Pending, Stats, Withdrawn, netns_cookie, probe_support,
    socket_cookie,
};
use rustix::net::{AddressFamily, SocketType, ipproto, sockopt};

use crate::common::can_run;

/// Longest any single wait in these tests may take.
const DEADLINE: Duration = Duration::from_secs(2);

fn privileged(test: &str) -> bool {
    can_run(
        &format!("root, to load eBPF programs ({test})"),
        rustix::process::geteuid().is_root(),
    )
}

/// Polls `check` until it returns true or [`DEADLINE`] passes.
fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if check() {
            return true;
        }
        if start.elapsed() > DEADLINE {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Accepts one connection on `listener` within [`DEADLINE`].
fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(true).unwrap();
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(DEADLINE)).unwrap();
                stream.set_write_timeout(Some(DEADLINE)).unwrap();
                return (stream, peer);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                assert!(start.elapsed() < DEADLINE, "no connection accepted in time");
                thread::sleep(Duration::from_millis(5));
            }
            Err(err) => panic!("accept: {err}"),
        }
    }
}

/// A TCP socket of `ip`'s family, not yet connected.
fn fresh_socket(ip: IpAddr) -> OwnedFd {
    let family = if ip.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket(family, SocketType::STREAM, Some(ipproto::TCP)).unwrap();
    // A blocking connect honours the send timeout: bounds the handshake.
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, Some(DEADLINE)).unwrap();
    fd
}

fn connect(fd: OwnedFd, to: SocketAddr) -> TcpStream {
    rustix::net::connect(&fd, &to).unwrap();
    let stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.set_write_timeout(Some(DEADLINE)).unwrap();
    stream
}

fn loaded_program_ids() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect()
}

/// Ids of the bpf_links (cgroup attachments) that run program `id`.
fn links_of(id: u32) -> Vec<u32> {
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .filter(|l| l.program_id() == id)
        .map(|l| l.id())
        .collect()
}

fn load() -> KernelPrograms {
    KernelPrograms::load()
        .unwrap_or_else(|err| panic!("KernelPrograms::load: {:#}", anyhow::Error::from(err)))
}

/// Reads exactly `n` bytes, or fails after [`DEADLINE`].
fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// Nothing is waiting to be read on `s` (checked without blocking).
fn nothing_to_read(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let idle = matches!((&*s).read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    idle
}

/// mux's side of a client connection writes to the client, which reads it
/// and answers: once mux's side has the answer, it has also processed the
/// client's ACK of what it wrote (the answer carries it).
fn exchange(mux_side: &TcpStream, client: &mut TcpStream) {
    let mut mux_side = mux_side;
    mux_side.write_all(b"ping").unwrap();
    assert_eq!(read_n(client, 4), b"ping");
    client.write_all(b"pong").unwrap();
    let mut answer = [0u8; 4];
    mux_side.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"pong");
}

/// The whole life of one connection on the kernel path, with mux's
/// outgoing socket of `local`'s family and the backend listening on
/// `listen`, played by hand: what mux does, step by step.
fn connection_cycle(local: IpAddr, listen: SocketAddr, base_key: u64) {
    let programs = load();
    // Another mux on the machine, idle: its programs run at every callback
    // of this one's sockets too, and must leave them alone.
    let other_mux = load();
    let ids = programs.program_ids().to_vec();
    assert_eq!(ids.len(), 2, "two programs: sock_ops and sk_msg");
    for id in &ids {
        assert!(
            loaded_program_ids().contains(id),
            "program {id} not listed by the kernel"
        );
    }
    // sock_ops hangs off the cgroup through a link; sk_msg off the map.
    assert_eq!(
        links_of(ids[0]).len(),
        1,
        "sock_ops should have one cgroup link"
    );
    assert_eq!(programs.stats().unwrap(), Stats::default());
    let (backend_key, client_key) = (base_key + 1, base_key);

    // The client side: a client connected to "mux", whose accepted socket
    // goes into MUX_CLIENT_SOCK before mux dials the backend.
    let front = TcpListener::bind(SocketAddr::new(local, 0)).unwrap();
    // Registered as mux's listener, so its accepted sockets report ACKs.
    programs
        .listen(
            netns_cookie(&front).unwrap(),
            front.local_addr().unwrap().port(),
        )
        .unwrap();
    let mut client = TcpStream::connect_timeout(&front.local_addr().unwrap(), DEADLINE).unwrap();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    let (mux_client, _) = accept(&front);
    programs
        .insert_client_socket(client_key, &mux_client)
        .unwrap();

    // The backend side: publish the outgoing socket by cookie, connect.
    let listener = TcpListener::bind(listen).unwrap();
    let backend = listener.local_addr().unwrap();
    let backend = SocketAddr::new(backend.ip().to_canonical(), backend.port());
    let fd = fresh_socket(local);
    let cookie = socket_cookie(&fd).unwrap();
    let client_cookie = socket_cookie(&mux_client).unwrap();
    programs
        .publish(cookie, Pending::new(backend_key, client_key, client_cookie))
        .unwrap();
    let mut outgoing = connect(fd, backend);
    let (mut accepted, peer) = accept(&listener);
    // The v4-mapped case only tests something if the backend really sees an
    // IPv6 (mapped) peer.
    assert_eq!(peer.is_ipv6(), listen.is_ipv6(), "backend peer {peer}");

    // sock_ops recorded the flow at connect time and captured the backend's
    // socket when its handshake completed.
    let flow = Flow::new(
        netns_cookie(&outgoing).unwrap(),
        outgoing.local_addr().unwrap(),
        outgoing.peer_addr().unwrap(),
    );
    let pending = programs.pending(cookie).unwrap().expect("pending entry");
    assert_eq!(pending.connected, 1);
    assert_eq!(pending.flow, flow);
    assert!(
        eventually(|| programs.has_socket(backend_key).unwrap()),
        "backend socket not inserted within {DEADLINE:?}; stats {:?}",
        programs.stats()
    );
    assert_eq!(
        programs.socket_cookie(backend_key).unwrap(),
        Some(sockopt::socket_cookie(&accepted).unwrap()),
        "the socket under backend_key is the backend's accepted socket"
    );
    assert_eq!(programs.flow(&flow).unwrap().map(|c| c.captured), Some(1));

    // Until mux reports a delivery, which it does once the backend sends in
    // bulk, the backend's sends take the normal path to mux's outgoing
    // socket, and mux relays them.
    accepted.write_all(b"held").unwrap();
    assert_eq!(read_n(&mut outgoing, 4), b"held");
    (&mux_client).write_all(b"held").unwrap();
    assert_eq!(read_n(&mut client, 4), b"held");
    programs.delivered(client_cookie, 4).unwrap();
    // From then on the backend's sends reach the client directly; mux's
    // outgoing socket sees none of them.
    accepted.write_all(b"hello from the backend").unwrap();
    assert_eq!(read_n(&mut client, 22), b"hello from the backend");
    assert!(
        nothing_to_read(&outgoing),
        "redirected bytes also reached mux's outgoing socket"
    );
    // sock_ops follows what the client acknowledged, for the bound.
    assert!(
        eventually(|| programs
            .client(client_cookie)
            .unwrap()
            .is_some_and(|c| c.acked == 26)),
        "client entry: {:?}",
        programs.client(client_cookie)
    );
    // Upload takes the normal path.
    outgoing.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut accepted, 4), b"ping");
    let stats = programs.stats().unwrap();
    assert_eq!(
        (stats.captured, stats.insert_failed, stats.flow_failed),
        (1, 0, 0)
    );
    assert!(stats.redirected >= 1, "{stats:?}");
    assert_eq!(stats.spilled, 1, "the held send: {stats:?}");
    assert_eq!(stats.acks_unwatched, 0, "a published client: {stats:?}");

    // A connection from an unpublished socket is left alone.
    let mut stranger = TcpStream::connect_timeout(&backend, DEADLINE).unwrap();
    stranger.set_read_timeout(Some(DEADLINE)).unwrap();
    let (mut stranger_accepted, _) = accept(&listener);
    thread::sleep(Duration::from_millis(50));
    assert_eq!(programs.socket_keys().unwrap(), vec![backend_key]);
    assert_eq!(programs.client_socket_keys().unwrap(), vec![client_key]);
    stranger_accepted.write_all(b"not yours").unwrap();
    assert_eq!(read_n(&mut stranger, 9), b"not yours");

    // Withdrawing reads the kernel's count and removes every entry; the
    // backend's sends then take the normal path again.
    assert_eq!(
        programs.withdraw(cookie).unwrap(),
        Some(Withdrawn {
            connected: true,
            captured: true,
            down_bytes: 22,
            client_acked: 26
        })
    );
    assert_eq!(programs.withdraw(cookie).unwrap(), None);
    assert_eq!(programs.connection_entries().unwrap(), (0, 0, 0));
    assert!(programs.socket_keys().unwrap().is_empty());
    assert!(programs.client_socket_keys().unwrap().is_empty());
    accepted.write_all(b"after").unwrap();
    assert_eq!(read_n(&mut outgoing, 5), b"after");

    // The client's ACKs no longer run the program: the first one after
    // the withdrawal turns its callbacks off. The same for a client of
    // mux's listener that is never published.
    let acks_unwatched = || programs.stats().unwrap().acks_unwatched;
    exchange(&mux_client, &mut client);
    assert_eq!(acks_unwatched(), 1, "the first ACK after leaving");
    exchange(&mux_client, &mut client);
    assert_eq!(acks_unwatched(), 1, "a later ACK ran the program");
    let mut other = TcpStream::connect_timeout(&front.local_addr().unwrap(), DEADLINE).unwrap();
    other.set_read_timeout(Some(DEADLINE)).unwrap();
    let (mux_other, _) = accept(&front);
    for _ in 0..3 {
        exchange(&mux_other, &mut other);
    }
    assert_eq!(acks_unwatched(), 2, "a client never published");

    // `auto` takes sock_ops off the cgroup while no connection needs it and
    // puts it back later: the program stays loaded, one link at most.
    assert!(programs.detach_sock_ops(), "was attached");
    assert!(!programs.detach_sock_ops(), "detached twice");
    assert!(
        eventually(|| links_of(ids[0]).is_empty()),
        "sock_ops still linked after detaching"
    );
    assert!(loaded_program_ids().contains(&ids[0]), "unloaded on detach");
    assert!(programs.attach_sock_ops().unwrap(), "was detached");
    assert!(!programs.attach_sock_ops().unwrap(), "attached twice");
    assert_eq!(links_of(ids[0]).len(), 1, "one link after attaching again");
    assert_eq!(
        other_mux.stats().unwrap(),
        Stats::default(),
        "another mux's programs acted on this one's connections"
    );

    // Dropping KernelPrograms detaches and unloads: the programs and the
    // cgroup link leave the kernel's lists (the link made again included).
    drop(programs);
    assert!(
        eventually(
            || !loaded_program_ids().iter().any(|p| ids.contains(p)) && links_of(ids[0]).is_empty()
        ),
        "programs {ids:?} still loaded or linked after drop"
    );
}

#[test]
fn kernel_support() {
    if !privileged("kernel_support") {
        return;
    }
    if let Err(err) = probe_support() {
        panic!("probe_support: {:#}", anyhow::Error::from(err));
    }
    let cgroup = mux::ebpf::cgroup2_mount().unwrap();
    assert!(
        cgroup.join("cgroup.procs").is_file(),
        "{} is no cgroup v2 root",
        cgroup.display()
    );
}

#[test]
fn connection_ipv4() {
    if !privileged("connection_ipv4") {
        return;
    }
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    connection_cycle(lo, SocketAddr::new(lo, 0), 0x4_0000_0000);
}

#[test]
fn connection_ipv6() {
    if !privileged("connection_ipv6") {
        return;
    }
    let lo = IpAddr::V6(Ipv6Addr::LOCALHOST);
    connection_cycle(lo, SocketAddr::new(lo, 0), 0x6_0000_0000);
}

/// mux on IPv4, backend on a dual-stack IPv6 socket: the backend's socket
/// is AF_INET6 with ends ::ffff:127.0.0.1, which the programs must
/// canonicalise to the IPv4 flow mux's socket has.
#[test]
fn connection_v4_mapped() {
    if !privileged("connection_v4_mapped") {
        return;
    }
    let mapped = Ipv4Addr::LOCALHOST.to_ipv6_mapped();
    connection_cycle(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        SocketAddr::new(IpAddr::V6(mapped), 0),
        0x46_0000_0000,
    );
}

/// Attaching shares the cgroup: a second instance (or any other tool using
/// multi mode) loads alongside, and each detaches on its own.
#[test]
fn instances_coexist() {
    if !privileged("instances_coexist") {
        return;
    }
    let first = load();
    let second = load();
    let (a, b) = (first.program_ids()[0], second.program_ids()[0]);
    assert_ne!(a, b);
    assert_eq!(links_of(a).len(), 1);
    assert_eq!(links_of(b).len(), 1);
    drop(first);
    assert!(eventually(|| !loaded_program_ids().contains(&a)));
    assert!(
        loaded_program_ids().contains(&b),
        "dropping one instance detached the other"
    );
    assert_eq!(links_of(b).len(), 1);
    drop(second);
    assert!(eventually(|| !loaded_program_ids().contains(&b)));
}

/// A published socket that never connects leaves one entry, which
/// withdrawing removes; publishing the same cookie twice is refused.
#[test]
fn unconnected_publication_is_withdrawn() {
    if !privileged("unconnected_publication_is_withdrawn") {
        return;
    }
    let programs = load();
    let fd = fresh_socket(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let cookie = socket_cookie(&fd).unwrap();
    programs.publish(cookie, Pending::new(1, 2, 3)).unwrap();
    assert!(matches!(
        programs.publish(cookie, Pending::new(4, 5, 6)),
        Err(EbpfError::Map { .. })
    ));
    assert_eq!(programs.connection_entries().unwrap(), (1, 0, 1));
    assert_eq!(
        programs.withdraw(cookie).unwrap(),
        Some(Withdrawn::default())
    );
    assert_eq!(programs.connection_entries().unwrap(), (0, 0, 0));
}
