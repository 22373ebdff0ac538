//! Tests that load mux's eBPF programs into the running kernel and watch them
//! act on real loopback connections. They need root.
//!
//! Rule: with `CI=true` they must run, so not being root (or a kernel that
//! refuses the programs) is a failure, never a skip. Elsewhere a non-root
//! run skips each test with a printed reason. Every wait is bounded and all
//! traffic stays on loopback.

mod privileged {
    use std::{
        io::{self, Read as _, Write as _},
        net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
        os::fd::OwnedFd,
        thread,
        time::{Duration, Instant},
    };

    use mux::ebpf::{Capture, EbpfError, KernelPrograms, Stats, endpoint_of, probe_support};
    use rustix::net::{AddressFamily, SocketType, ipproto, sockopt};

    /// Longest any single wait in these tests may take.
    const DEADLINE: Duration = Duration::from_secs(2);

    fn in_ci() -> bool {
        std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
    }

    /// Whether the test may go on: true as root; outside CI a non-root run
    /// prints why and skips; in CI it fails.
    fn privileged_or_skip(test: &str) -> bool {
        if rustix::process::geteuid().is_root() {
            return true;
        }
        assert!(
            !in_ci(),
            "{test}: CI=true but not running as root; privileged tests must run in CI"
        );
        eprintln!("skipping {test}: not root (these tests load eBPF programs)");
        false
    }

    /// Polls `check` until it returns true or [`DEADLINE`] passes; returns its
    /// last answer.
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

    /// What mux does for a backend connection: a TCP socket bound to a
    /// concrete local address (port chosen by the kernel), not yet connected.
    fn bound_socket(local: IpAddr) -> OwnedFd {
        let family = if local.is_ipv4() {
            AddressFamily::INET
        } else {
            AddressFamily::INET6
        };
        let fd = rustix::net::socket(family, SocketType::STREAM, Some(ipproto::TCP)).unwrap();
        rustix::net::bind(&fd, &SocketAddr::new(local, 0)).unwrap();
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
        match KernelPrograms::load() {
            Ok(programs) => programs,
            Err(err) => panic!("KernelPrograms::load: {}", error_chain(&err)),
        }
    }

    fn error_chain(err: &dyn std::error::Error) -> String {
        let mut text = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }

    /// Bytes still go through both sockets, in both directions, once the
    /// backend's socket is in the sockhash (no verdict program yet, so the
    /// kernel must leave the data path as it was).
    fn echo(a: &mut TcpStream, b: &mut TcpStream) {
        let mut buf = [0u8; 4];
        a.write_all(b"ping").unwrap();
        b.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        b.write_all(b"pong").unwrap();
        a.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
    }

    /// The whole life of one captured connection, mux's outgoing socket bound
    /// to `local` and the backend listening on `listen`.
    fn capture_cycle(local: IpAddr, listen: SocketAddr, backend_key: u64) {
        let mut programs = load();
        let ids = programs.program_ids().to_vec();
        println!("loaded {programs:?}");
        assert_eq!(ids.len(), 1, "one program: sock_ops");
        let id = ids[0];
        assert!(
            loaded_program_ids().contains(&id),
            "program {id} not listed by the kernel"
        );
        let links = links_of(id);
        assert_eq!(
            links.len(),
            1,
            "program {id} should have one cgroup link, has {links:?}"
        );
        assert_eq!(programs.stats().unwrap(), Stats::default());

        let listener = TcpListener::bind(listen).unwrap();
        // Where the client connects: for a dual-stack listener bound to
        // ::ffff:127.0.0.1 that is plain 127.0.0.1 (the client is IPv4).
        let backend = listener.local_addr().unwrap();
        let backend = SocketAddr::new(backend.ip().to_canonical(), backend.port());
        let client_key = backend_key + 1;

        // Publish mux's outgoing endpoint, then connect: the backend's
        // accepted socket must land in MUX_SOCKS under backend_key.
        let fd = bound_socket(local);
        let endpoint = endpoint_of(&fd).unwrap();
        let capture = Capture::new(backend_key, client_key);
        programs.capture(&endpoint, capture).unwrap();
        assert_eq!(programs.captured(&endpoint).unwrap(), Some(capture));
        let mut outgoing = connect(fd, backend);
        let (mut accepted, peer) = accept(&listener);
        // The v4-mapped case only tests something if the backend really
        // sees an IPv6 (mapped) peer.
        assert_eq!(peer.is_ipv6(), listen.is_ipv6(), "backend peer {peer}");
        assert_eq!(
            SocketAddr::new(peer.ip().to_canonical(), peer.port()),
            outgoing.local_addr().unwrap(),
            "the backend sees mux's published endpoint as its peer"
        );
        assert!(
            eventually(|| programs.has_socket(backend_key).unwrap()),
            "backend socket not inserted under {backend_key:#x} within {DEADLINE:?}; stats {:?}",
            programs.stats()
        );
        assert_eq!(
            programs.socket_cookie(backend_key).unwrap(),
            Some(sockopt::socket_cookie(&accepted).unwrap()),
            "the socket under backend_key is the backend's accepted socket"
        );
        assert_eq!(
            programs.stats().unwrap(),
            Stats {
                captured: 1,
                insert_failed: 0
            }
        );
        echo(&mut outgoing, &mut accepted);

        // A connection from an unpublished port is left alone. The
        // callback runs at establishment, before or about when accept
        // returns, so waiting a little after accept covers it.
        let mut stranger = TcpStream::connect_timeout(&backend, DEADLINE).unwrap();
        stranger.set_read_timeout(Some(DEADLINE)).unwrap();
        let (mut stranger_accepted, _) = accept(&listener);
        thread::sleep(Duration::from_millis(100));
        assert_eq!(programs.socket_keys().unwrap(), vec![backend_key]);
        assert_eq!(programs.stats().unwrap().captured, 1);
        echo(&mut stranger, &mut stranger_accepted);

        // User space can add its own established socket (the client side, in
        // mux) and remove it.
        programs.insert_socket(client_key, &outgoing).unwrap();
        assert_eq!(
            programs.socket_cookie(client_key).unwrap(),
            Some(sockopt::socket_cookie(&outgoing).unwrap())
        );
        assert_eq!(
            programs.socket_keys().unwrap(),
            vec![backend_key, client_key]
        );
        assert!(programs.remove_socket(client_key).unwrap());
        assert!(!programs.remove_socket(client_key).unwrap());
        assert!(!programs.has_socket(client_key).unwrap());

        // Closing the backend's socket takes it out of the map.
        drop(accepted);
        assert!(
            eventually(|| !programs.has_socket(backend_key).unwrap()),
            "closed backend socket still in MUX_SOCKS after {DEADLINE:?}"
        );
        assert!(programs.socket_keys().unwrap().is_empty());

        assert!(programs.forget(&endpoint).unwrap());
        assert!(!programs.forget(&endpoint).unwrap());
        assert_eq!(programs.captured(&endpoint).unwrap(), None);

        // Dropping KernelPrograms detaches and unloads: the program and its
        // cgroup link leave the kernel's lists.
        drop(programs);
        assert!(
            eventually(|| !loaded_program_ids().contains(&id) && links_of(id).is_empty()),
            "program {id} still loaded or linked after drop: links {:?}",
            links_of(id)
        );
        drop((outgoing, stranger, stranger_accepted, listener));
    }

    #[test]
    fn kernel_support() {
        if !privileged_or_skip("kernel_support") {
            return;
        }
        if let Err(err) = probe_support() {
            panic!("probe_support: {}", error_chain(&err));
        }
        let cgroup = mux::ebpf::cgroup2_mount().unwrap();
        assert!(
            cgroup.join("cgroup.procs").is_file(),
            "{} is no cgroup v2 root",
            cgroup.display()
        );
    }

    #[test]
    fn capture_ipv4() {
        if !privileged_or_skip("capture_ipv4") {
            return;
        }
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        capture_cycle(lo, SocketAddr::new(lo, 0), 0x4_0000_0000);
    }

    #[test]
    fn capture_ipv6() {
        if !privileged_or_skip("capture_ipv6") {
            return;
        }
        let lo = IpAddr::V6(Ipv6Addr::LOCALHOST);
        capture_cycle(lo, SocketAddr::new(lo, 0), 0x6_0000_0000);
    }

    /// mux on IPv4, backend on a dual-stack IPv6 socket: the backend's
    /// socket is AF_INET6 with peer ::ffff:127.0.0.1, which the program must
    /// canonicalise to the IPv4 endpoint mux published.
    #[test]
    fn capture_v4_mapped() {
        if !privileged_or_skip("capture_v4_mapped") {
            return;
        }
        let mapped = Ipv4Addr::LOCALHOST.to_ipv6_mapped();
        capture_cycle(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            SocketAddr::new(IpAddr::V6(mapped), 0),
            0x46_0000_0000,
        );
    }

    /// Attaching shares the cgroup: a second instance (or any other tool
    /// using multi mode) loads alongside, and each detaches on its own.
    #[test]
    fn instances_coexist() {
        if !privileged_or_skip("instances_coexist") {
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

    /// A key that nothing published never gets a socket, and the error type
    /// of a bad endpoint is a socket error, not a panic.
    #[test]
    fn unbound_socket_is_refused() {
        if !privileged_or_skip("unbound_socket_is_refused") {
            return;
        }
        let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
        assert!(matches!(endpoint_of(&fd), Err(EbpfError::Socket { .. })));
    }
}
