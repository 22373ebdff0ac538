//! Where a field of a kernel struct lies in this kernel's memory, read from
//! its BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The sk_msg program reads one field of the backend's `struct tcp_sock`
//! (`write_seq`), whose offset differs between kernel builds. aya-ebpf has no
//! CO-RE relocations, so user space looks the offset up here and hands it
//! to the program as a constant before loading it. Pure parsing: the caller
//! reads the file.

/// `BTF_KIND_STRUCT`.
const KIND_STRUCT: u32 = 4;
/// `BTF_KIND_UNION`.
const KIND_UNION: u32 = 5;
const MAGIC: u16 = 0xeb9f;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF data (bad magic or header)")]
    Header,
    #[error("BTF data cut short")]
    Truncated,
    #[error("BTF type kind {0} unknown to mux")]
    UnknownKind(u32),
    #[error("no struct {0} in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {strukt} has no field {field} in the kernel's BTF")]
    NoField { strukt: String, field: String },
}

/// One type's header, and where its members are if it is a struct or union.
struct Type {
    name_off: u32,
    kind: u32,
    /// Bitfield member offsets are encoded (`kind_flag`).
    kind_flag: bool,
    /// Members' start in the type section and their count.
    members: (usize, usize),
}

/// The byte offset of `field` in `struct strukt`, looking into anonymous
/// structs and unions nested in it. `data` is a whole BTF blob in native
/// byte order (as the kernel exports it).
pub fn field_offset(data: &[u8], strukt: &str, field: &str) -> Result<u32, BtfError> {
    let u16_at = |at: usize| -> Result<u16, BtfError> {
        let b = data.get(at..at + 2).ok_or(BtfError::Truncated)?;
        Ok(u16::from_ne_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| -> Result<u32, BtfError> {
        let b = data.get(at..at + 4).ok_or(BtfError::Truncated)?;
        Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    if u16_at(0)? != MAGIC {
        return Err(BtfError::Header);
    }
    let hdr_len = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
    let types_at = hdr_len.checked_add(type_off).ok_or(BtfError::Header)?;
    let types_end = types_at.checked_add(type_len).ok_or(BtfError::Header)?;
    let strings_at = hdr_len.checked_add(str_off).ok_or(BtfError::Header)?;
    let strings = data
        .get(strings_at..strings_at.checked_add(str_len).ok_or(BtfError::Header)?)
        .ok_or(BtfError::Truncated)?;
    let name = |off: u32| -> &[u8] {
        let rest = strings.get(off as usize..).unwrap_or(&[]);
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    };

    // Type ids start at 1; index 0 stands for `void`.
    let mut types = vec![Type {
        name_off: 0,
        kind: 0,
        kind_flag: false,
        members: (0, 0),
    }];
    let mut at = types_at;
    while at < types_end {
        let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        at += 12;
        let extra = match kind {
            // ptr, fwd, typedef, volatile, const, restrict, func, float,
            // type_tag
            2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
            // int, var, decl_tag
            1 | 14 | 17 => 4,
            3 => 12,
            KIND_STRUCT | KIND_UNION | 15 | 19 => 12 * vlen,
            6 | 13 => 8 * vlen,
            other => return Err(BtfError::UnknownKind(other)),
        };
        types.push(Type {
            name_off,
            kind,
            kind_flag: info >> 31 == 1,
            members: (at, vlen),
        });
        at += extra;
    }
    if at != types_end {
        return Err(BtfError::Truncated);
    }

    let is_aggregate = |t: &Type| t.kind == KIND_STRUCT || t.kind == KIND_UNION;
    let top = types
        .iter()
        .position(|t| t.kind == KIND_STRUCT && name(t.name_off) == strukt.as_bytes())
        .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
    // Depth-first through anonymous members: (type id, bit offset so far).
    let mut stack = vec![(top, 0u32)];
    while let Some((id, base)) = stack.pop() {
        let t = &types[id];
        let (first, count) = t.members;
        for i in 0..count {
            let m = first + 12 * i;
            let (m_name, m_type, m_offset) = (u32_at(m)?, u32_at(m + 4)?, u32_at(m + 8)?);
            let bits = base
                + if t.kind_flag {
                    m_offset & 0xff_ffff
                } else {
                    m_offset
                };
            if m_name == 0 {
                if types.get(m_type as usize).is_some_and(is_aggregate) {
                    stack.push((m_type as usize, bits));
                }
            } else if name(m_name) == field.as_bytes() {
                return Ok(bits / 8);
            }
        }
    }
    Err(BtfError::NoField {
        strukt: strukt.into(),
        field: field.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `struct outer { u32 a; union { u32 b; u32 c; }; u32 d; }`
    /// laid out at byte offsets 0, 8 (the union) and 16.
    fn blob() -> Vec<u8> {
        let strings = b"\0outer\0a\0b\0c\0d\0int\0";
        let name = |s: &str| {
            let mut n = Vec::from(s.as_bytes());
            n.push(0);
            strings.windows(n.len()).position(|w| w == n).unwrap() as u32
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_ne_bytes());
            }
        };
        // 1: int (4 bytes)
        push(&[name("int"), 1 << 24, 4, 32]);
        // 2: anonymous union { b, c }
        push(&[0, (KIND_UNION << 24) | 2, 4]);
        push(&[name("b"), 1, 0]);
        push(&[name("c"), 1, 0]);
        // 3: struct outer { a @0, <union> @64 bits, d @128 bits }
        push(&[name("outer"), (KIND_STRUCT << 24) | 3, 20]);
        push(&[name("a"), 1, 0]);
        push(&[0, 2, 64]);
        push(&[name("d"), 1, 128]);
        let mut data = Vec::new();
        data.extend_from_slice(&MAGIC.to_ne_bytes());
        data.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            data.extend_from_slice(&w.to_ne_bytes());
        }
        data.extend_from_slice(&types);
        data.extend_from_slice(strings);
        data
    }

    #[test]
    fn finds_direct_and_nested_fields() {
        let data = blob();
        assert_eq!(field_offset(&data, "outer", "a"), Ok(0));
        assert_eq!(field_offset(&data, "outer", "c"), Ok(8));
        assert_eq!(field_offset(&data, "outer", "d"), Ok(16));
    }

    #[test]
    fn says_what_is_missing() {
        let data = blob();
        assert_eq!(
            field_offset(&data, "inner", "a"),
            Err(BtfError::NoStruct("inner".into()))
        );
        assert!(matches!(
            field_offset(&data, "outer", "e"),
            Err(BtfError::NoField { .. })
        ));
        assert_eq!(
            field_offset(b"nonsense", "outer", "a"),
            Err(BtfError::Header)
        );
        assert_eq!(
            field_offset(&data[..data.len() - 30], "outer", "a"),
            Err(BtfError::Truncated)
        );
    }

    #[test]
    fn reads_this_kernels_tcp_sock() {
        let data = match std::fs::read("/sys/kernel/btf/vmlinux") {
            Ok(data) => data,
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("skipped: no kernel BTF here ({e})");
                return;
            }
            Err(e) => panic!("reading the kernel's BTF: {e}"),
        };
        let write_seq = field_offset(&data, "tcp_sock", "write_seq").unwrap();
        let snd_una = field_offset(&data, "tcp_sock", "snd_una").unwrap();
        // Both lie past the embedded struct sock, and differ.
        assert!(write_seq > 512 && snd_una > 512 && write_seq != snd_una);
    }
}
