//! Tracepoint record layouts, read from tracefs `format` files instead of assumed: field offsets
//! move between kernel versions, and the `print fmt` line names the values of enum fields (drop
//! and reset reasons).

use std::{collections::HashMap, io, path::Path};

/// Where tracefs is mounted on current kernels.
pub const TRACEFS: &str = "/sys/kernel/tracing";
const TRACEFS_MAGIC: i64 = 0x7472_6163;

/// A tracepoint's record layout and value names.
#[derive(Debug, Default, Clone)]
pub struct Format {
    /// Field offsets by name (`saddr`, `reason`...).
    pub offsets: HashMap<String, u32>,
    /// Names of enum values printed with `__print_symbolic` (all such fields merged).
    pub symbols: HashMap<u32, String>,
}

impl Format {
    /// Parses a `format` file's text.
    pub fn parse(text: &str) -> Self {
        let mut offsets = HashMap::new();
        for line in text.lines() {
            let Some(rest) = line.trim().strip_prefix("field:") else { continue };
            let mut parts = rest.split(';');
            let declaration = parts.next().unwrap_or_default();
            // `__u8 saddr[28]` → `saddr`; `const void * skaddr` → `skaddr`.
            let name = declaration.split_whitespace().last().unwrap_or_default();
            let name = name.split('[').next().unwrap_or_default().trim_start_matches('*');
            let offset =
                parts.find_map(|p| p.trim().strip_prefix("offset:")).and_then(|o| o.trim().parse().ok());
            if let Some(offset) = offset {
                offsets.insert(name.to_owned(), offset);
            }
        }
        let mut symbols = HashMap::new();
        if let Some(fmt) = text.lines().find(|l| l.starts_with("print fmt:")) {
            // `{ 2, "NOT_SPECIFIED" }` pairs.
            for pair in fmt.split('{').skip(1) {
                let Some((value, rest)) = pair.split_once(',') else { continue };
                let Ok(value) = value.trim().parse::<u32>() else { continue };
                if let Some(name) = rest.split('"').nth(1) {
                    symbols.insert(value, name.to_owned());
                }
            }
        }
        Self { offsets, symbols }
    }

    /// Reads `events/<category>/<name>/format` under tracefs.
    pub fn read(category: &str, name: &str) -> io::Result<Self> {
        let path = Path::new(TRACEFS).join("events").join(category).join(name).join("format");
        Ok(Self::parse(&std::fs::read_to_string(path)?))
    }

    /// The offset of `field`, or an error naming it.
    pub fn offset(&self, field: &str) -> Result<u32, String> {
        self.offsets.get(field).copied().ok_or_else(|| format!("field {field} missing"))
    }
}

/// Mounts tracefs unless it is there (tracepoint attachment needs it).
pub fn ensure_mounted() -> io::Result<()> {
    let path = Path::new(TRACEFS);
    if crate::sys::fs_magic(path) == Some(TRACEFS_MAGIC) {
        return Ok(());
    }
    nix::mount::mount(Some("nodev"), path, Some("tracefs"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KFREE: &str = "name: kfree_skb\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;\n\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;\n\tfield:__u8 saddr[28];\toffset:40;\tsize:28;\tsigned:0;\n\nprint fmt: \"reason: %s\", __print_symbolic(REC->reason, { 2, \"NOT_SPECIFIED\" }, { 3, \"NO_SOCKET\" }, { 117, \"TCP_RESET\" })\n";

    #[test]
    fn parses_offsets_and_symbols() {
        let f = Format::parse(KFREE);
        assert_eq!(f.offset("protocol"), Ok(32));
        assert_eq!(f.offset("reason"), Ok(36));
        assert_eq!(f.offset("skbaddr"), Ok(8));
        assert_eq!(f.offset("saddr"), Ok(40));
        assert!(f.offset("nope").is_err());
        assert_eq!(f.symbols.get(&3).map(String::as_str), Some("NO_SOCKET"));
        assert_eq!(f.symbols.get(&117).map(String::as_str), Some("TCP_RESET"));
    }

    #[test]
    #[ignore = "needs root (tracefs); the privileged tier runs it"]
    fn this_kernel_has_the_formats_we_read() {
        // Every machine this runs on has tracefs (mounted on demand); the fields must be there.
        ensure_mounted().expect("tracefs");
        let recv = Format::read("tcp", "tcp_receive_reset").expect("format");
        for field in ["sport", "dport", "family", "saddr", "daddr", "sock_cookie"] {
            recv.offset(field).expect(field);
        }
        let drop = Format::read("skb", "kfree_skb").expect("format");
        assert!(drop.symbols.values().any(|s| s == "NO_SOCKET"), "drop reasons are named");
    }
}
