//! The sk_lookup program that takes a port over: loaded on its own (the data
//! path's programs need not be), attached to mux's network namespace.

use std::{fs::File, net::SocketAddr, os::fd::AsFd};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, SockMap},
    programs::SkLookup,
};
use mux_common::{LISTENER_V4, LISTENER_V6, MAP_LISTENERS, MAP_TAKEOVER, PROG_SK_LOOKUP};
use std::net::TcpListener;

use super::{
    EbpfError,
    loader::{OBJECT, program},
};

/// The attached program. The link lives in `Ebpf` and only this process
/// holds it: dropping the value, exiting, or dying by SIGKILL detaches it,
/// and the taken-over ports fall back to their own listeners at once.
pub struct PortTakeover {
    _ebpf: Ebpf,
    program_id: u32,
}

impl std::fmt::Debug for PortTakeover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortTakeover")
            .field("program_id", &self.program_id)
            .finish_non_exhaustive()
    }
}

impl PortTakeover {
    /// Steers new connections to `ports` from other hosts to `listeners`
    /// (the first IPv4 one for IPv4 clients, the first IPv6 one for IPv6).
    pub fn start(ports: &[u16], listeners: &[TcpListener]) -> Result<PortTakeover, EbpfError> {
        if OBJECT.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let mut ebpf = EbpfLoader::new().load(OBJECT)?;
        let map_error = |name: &'static str| move |source| EbpfError::Map { name, source };
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or(EbpfError::Missing { kind: "map", name })
        };

        let mut taken: HashMap<MapData, u32, u32> =
            HashMap::try_from(take(&mut ebpf, MAP_TAKEOVER)?).map_err(map_error(MAP_TAKEOVER))?;
        for &port in ports {
            taken
                .insert(u32::from(port), 1, 0)
                .map_err(map_error(MAP_TAKEOVER))?;
        }
        let mut targets: SockMap<MapData> =
            SockMap::try_from(take(&mut ebpf, MAP_LISTENERS)?).map_err(map_error(MAP_LISTENERS))?;
        let first = |v4: bool| {
            listeners
                .iter()
                .find(|l| l.local_addr().is_ok_and(|a: SocketAddr| a.is_ipv4() == v4))
        };
        for (v4, index) in [(true, LISTENER_V4), (false, LISTENER_V6)] {
            if let Some(listener) = first(v4) {
                targets
                    .set(index, listener, 0)
                    .map_err(map_error(MAP_LISTENERS))?;
            }
        }

        let program_error = |source| EbpfError::Program {
            name: PROG_SK_LOOKUP,
            source,
        };
        let program: &mut SkLookup = program(&mut ebpf, PROG_SK_LOOKUP)?;
        program.load().map_err(program_error)?;
        let path = "/proc/self/ns/net";
        let netns = File::open(path).map_err(|source| EbpfError::Io {
            what: "opening",
            path: path.into(),
            source,
        })?;
        program.attach(netns.as_fd()).map_err(program_error)?;
        let program_id = program.info().map_err(program_error)?.id();
        // The maps stay referenced by the program; their handles can go.
        drop((taken, targets));
        Ok(PortTakeover {
            _ebpf: ebpf,
            program_id,
        })
    }

    pub fn program_id(&self) -> u32 {
        self.program_id
    }
}
