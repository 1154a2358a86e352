//! `--netns`: each worker in a network namespace of its own, joined to the host by a veth pair
//! (a `/30` of `10.231.0.0/16`: its first address on the host side, its second in the
//! namespace), so that faults can be made by the kernel: `link_down` takes the host end of a worker's veth down, and TCP sees a
//! silent path (no FIN, no RST, retransmissions until the link is back); `link_crawl` puts a
//! token-bucket filter (`tc qdisc ... tbf`) on both ends of a worker's veth, so the kernel
//! paces its packets to a few kilobits per second and drops what overflows a short queue: a
//! crawling, lossy link that TCP has to retransmit through. Needs root and iproute2. Everything
//! created is named after this process and removed on drop.
//!
//! The pool is cut into [`SLOTS`] slots of 256 blocks, one slot a run: the one the process id
//! points at, or the next one none of whose blocks meets an address or a route the host has
//! already (another run's links, a local network), so that runs at the same time do not
//! share addresses.
//!
//! `tc netem` (arbitrary delay and random loss) would fit here too; the kernels this was built
//! on do not provide the `netem` qdisc, so the delay and loss here are the token bucket's.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, bail};

/// Most namespaces one run creates (one address block each).
pub const MAX_LINKS: usize = 250;

/// The pool of link addresses.
const POOL: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 0);
const POOL_PREFIX: u8 = 16;
/// Address blocks (`/30`) in a slot: at least [`MAX_LINKS`].
const SLOT_BLOCKS: u32 = 256;
/// Slots in the pool (`/16` of `/30` blocks, [`SLOT_BLOCKS`] a slot).
pub const SLOTS: u32 = (1 << (32 - POOL_PREFIX)) / 4 / SLOT_BLOCKS;

/// The network address of block `i` of `slot`.
fn block(slot: u32, i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    Ipv4Addr::from(u32::from(POOL) + (slot * SLOT_BLOCKS + i) * 4)
}

/// Whether the `/30` at `net` meets `prefix` (an address or a route of the host, its length).
/// A prefix wider than the pool (the default route, a VPN's `10.0.0.0/8`) does not count: the
/// links' own routes are more specific, and the run always took addresses under those.
fn meets(net: Ipv4Addr, (addr, len): (Ipv4Addr, u8)) -> bool {
    let mask = |len: u8| u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    let (net, addr) = (u32::from(net), u32::from(addr));
    let inside = addr & mask(30) == net;
    let covers = len >= POOL_PREFIX && (addr ^ net) & mask(len.min(30)) == 0;
    inside || covers
}

/// The first slot from `start` on (wrapping around) whose first `n` blocks meet none of
/// `used` (the host's addresses and routes); `None` when every slot does.
pub fn free_slot(n: usize, start: u32, used: &[(Ipv4Addr, u8)]) -> Option<u32> {
    (0..SLOTS)
        .map(|k| (start + k) % SLOTS)
        .find(|&slot| (0..n).all(|i| used.iter().all(|&p| !meets(block(slot, i), p))))
}

/// The IPv4 prefixes in `ip` output, one per line: the first word of each line that reads as
/// an address, with its length (32 when none is given), or `default`. Route lines start with
/// their destination (after a type such as `local`), `ip -o addr` lines have it after `inet`.
pub fn prefixes(text: &str) -> Vec<(Ipv4Addr, u8)> {
    text.lines()
        .filter_map(|line| {
            line.split_whitespace().find_map(|word| {
                if word == "default" {
                    return Some((Ipv4Addr::UNSPECIFIED, 0));
                }
                let (addr, len) = word.split_once('/').unwrap_or((word, "32"));
                let len = len.parse::<u8>().ok().filter(|l| *l <= 32)?;
                Some((addr.parse::<Ipv4Addr>().ok()?, len))
            })
        })
        .collect()
}

/// The host's IPv4 addresses (on links up or down) and routes (every table).
fn used_prefixes() -> anyhow::Result<Vec<(Ipv4Addr, u8)>> {
    let routes = run("ip", &["-4", "route", "show", "table", "all"])?;
    let addrs = run("ip", &["-4", "-o", "addr", "show"])?;
    Ok([prefixes(&routes), prefixes(&addrs)].concat())
}

/// One worker's namespace and veth pair.
#[derive(Debug, Clone)]
pub struct Link {
    pub ns: String,
    pub host_if: String,
    /// The veth end inside the namespace.
    pub peer_if: String,
    pub host_ip: Ipv4Addr,
    /// The address of the veth end inside the namespace.
    pub peer_ip: Ipv4Addr,
}

/// What a token-bucket filter did while it was in place, both ends summed (`tc -s`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShapeStats {
    pub sent_bytes: u64,
    pub sent_packets: u64,
    /// Packets dropped because the queue was full.
    pub dropped: u64,
    /// Times a packet had to wait for tokens.
    pub overlimits: u64,
}

impl ShapeStats {
    /// Whether the filter held back or dropped anything.
    pub fn fired(&self) -> bool {
        self.dropped > 0 || self.overlimits > 0
    }

    /// Reads the counters from `tc -s qdisc show` output
    /// (` Sent 1234 bytes 12 pkt (dropped 1, overlimits 5 requeues 0)`).
    pub fn parse(text: &str) -> Self {
        let mut s = ShapeStats::default();
        let words: Vec<&str> = text
            .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
            .filter(|w| !w.is_empty())
            .collect();
        for pair in words.windows(2) {
            let counter = match pair {
                ["Sent", n] => (&mut s.sent_bytes, n),
                ["dropped", n] => (&mut s.dropped, n),
                ["overlimits", n] => (&mut s.overlimits, n),
                [n, "pkt"] => (&mut s.sent_packets, n),
                _ => continue,
            };
            if let Ok(n) = counter.1.parse::<u64>() {
                *counter.0 += n;
            }
        }
        s
    }
}

impl std::ops::Add for ShapeStats {
    type Output = Self;

    /// Both ends of a link together.
    fn add(self, o: Self) -> Self {
        Self {
            sent_bytes: self.sent_bytes + o.sent_bytes,
            sent_packets: self.sent_packets + o.sent_packets,
            dropped: self.dropped + o.dropped,
            overlimits: self.overlimits + o.overlimits,
        }
    }
}

/// The token bucket of `link_crawl`: rate, bucket and queue (past it packets are dropped).
pub const CRAWL_BUCKET: &str = "2kb";
pub const CRAWL_QUEUE: &str = "3kb";

/// The namespaces of one run.
#[derive(Debug, Default)]
pub struct NetFleet {
    pub links: Vec<Link>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether this machine lets the run create namespaces; the reason when it does not.
pub fn available() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("network namespaces need root".into());
    }
    let probe = format!("tether-probe-{}", std::process::id());
    ip(&["netns", "add", &probe])
        .map_err(|e| format!("cannot create a network namespace: {e:#}"))?;
    // `link_crawl` needs the token-bucket filter.
    let tbf = tc_in(
        &probe,
        &[
            "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit", "burst", "4kb", "limit",
            "8kb",
        ],
    );
    let _ = ip(&["netns", "del", &probe]);
    tbf.map_err(|e| format!("no kernel token-bucket filter (tc tbf): {e:#}"))?;
    Ok(())
}

fn tc_in(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut v = vec!["netns", "exec", ns, "tc"];
    v.extend_from_slice(args);
    run("ip", &v)
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run `{program}` (iproute2)"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl NetFleet {
    /// Creates `n` namespaces with their veth pairs, up and addressed.
    pub fn create(n: usize) -> anyhow::Result<Self> {
        if n > MAX_LINKS {
            bail!("at most {MAX_LINKS} workers in namespaces");
        }
        let pid = std::process::id();
        let used = used_prefixes()?;
        let Some(slot) = free_slot(n, pid % SLOTS, &used) else {
            bail!(
                "no {n} address blocks free in {POOL}/{POOL_PREFIX}: each slot meets an address \
                 or a route of this host (other runs' links?)"
            );
        };
        let mut fleet = NetFleet::default();
        for i in 0..n {
            let net = u32::from(block(slot, i));
            let link = Link {
                ns: format!("tether-{pid}-{i}"),
                // Interface names have at most 15 bytes.
                host_if: format!("te{pid:x}h{i}"),
                peer_if: format!("te{pid:x}w{i}"),
                host_ip: Ipv4Addr::from(net + 1),
                peer_ip: Ipv4Addr::from(net + 2),
            };
            let peer = link.peer_if.clone();
            ip(&["netns", "add", &link.ns])?;
            fleet.links.push(link.clone());
            ip(&[
                "link",
                "add",
                &link.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ])?;
            ip(&["link", "set", &peer, "netns", &link.ns])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/30", link.host_ip),
                "dev",
                &link.host_if,
            ])?;
            ip(&["link", "set", &link.host_if, "up"])?;
            let inner = |args: &[&str]| {
                let mut v = vec!["netns", "exec", link.ns.as_str(), "ip"];
                v.extend_from_slice(args);
                ip(&v)
            };
            inner(&["addr", "add", &format!("{}/30", link.peer_ip), "dev", &peer])?;
            inner(&["link", "set", &peer, "up"])?;
            inner(&["link", "set", "lo", "up"])?;
        }
        Ok(fleet)
    }

    /// Takes the host end of worker `i`'s veth down or up.
    pub async fn set_link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        let Some(l) = self.links.get(i) else {
            bail!("no namespace for worker {i}");
        };
        let out = tokio::process::Command::new("ip")
            .args(["link", "set", &l.host_if, if up { "up" } else { "down" }])
            .output()
            .await
            .context("cannot run `ip`")?;
        if !out.status.success() {
            bail!(
                "cannot set {} {}: {}",
                l.host_if,
                if up { "up" } else { "down" },
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The kernel's operational state of the host end of worker `i`'s veth (`up`, `down`,
    /// ...), as `/sys/class/net/<if>/operstate` says.
    pub fn operstate(&self, i: usize) -> anyhow::Result<String> {
        let l = self.link(i)?;
        let path = format!("/sys/class/net/{}/operstate", l.host_if);
        let state =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        Ok(state.trim().to_owned())
    }
}

impl NetFleet {
    /// Paces worker `i`'s link to `rate` (a tc rate, e.g. `16kbit`) both ways, dropping what
    /// overflows a short queue.
    pub async fn crawl(&self, i: usize, rate: &str) -> anyhow::Result<()> {
        let l = self.link(i)?.clone();
        let tbf = |dev: &str| -> Vec<String> {
            [
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                CRAWL_BUCKET,
                "limit",
                CRAWL_QUEUE,
            ]
            .map(str::to_owned)
            .to_vec()
        };
        let (host, peer) = (tbf(&l.host_if), tbf(&l.peer_if));
        blocking(move || {
            run("tc", &strs(&host))?;
            tc_in(&l.ns, &strs(&peer))?;
            Ok(())
        })
        .await
    }

    /// What the filters of worker `i`'s link did so far, both ends summed.
    pub async fn crawl_stats(&self, i: usize) -> anyhow::Result<ShapeStats> {
        let l = self.link(i)?.clone();
        blocking(move || shape_stats(&l)).await
    }

    /// Removes the filters of worker `i`'s link; what they did while in place.
    pub async fn uncrawl(&self, i: usize) -> anyhow::Result<ShapeStats> {
        let l = self.link(i)?.clone();
        blocking(move || {
            let stats = shape_stats(&l)?;
            run("tc", &["qdisc", "del", "dev", &l.host_if, "root"])?;
            tc_in(&l.ns, &["qdisc", "del", "dev", &l.peer_if, "root"])?;
            Ok(stats)
        })
        .await
    }

    fn link(&self, i: usize) -> anyhow::Result<&Link> {
        self.links
            .get(i)
            .with_context(|| format!("no namespace for worker {i}"))
    }
}

/// The counters of the filters on both ends of `l` (`tc -s qdisc show`), summed.
fn shape_stats(l: &Link) -> anyhow::Result<ShapeStats> {
    let host = run("tc", &["-s", "qdisc", "show", "dev", &l.host_if])?;
    let peer = tc_in(&l.ns, &["-s", "qdisc", "show", "dev", &l.peer_if])?;
    Ok(ShapeStats::parse(&host) + ShapeStats::parse(&peer))
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("tc task panicked")?
}

impl Drop for NetFleet {
    fn drop(&mut self) {
        for l in &self.links {
            // Deleting one end of a veth pair deletes both.
            let _ = ip(&["link", "del", &l.host_if]);
            let _ = ip(&["netns", "del", &l.ns]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_takes_the_slot_its_process_id_points_at_unless_the_host_uses_its_addresses() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().expect("address");
        // Slot 5 is 10.231.20.0 to 10.231.23.255; its blocks are /30s.
        assert_eq!(block(5, 0), ip("10.231.20.0"));
        assert_eq!(block(5, 65), ip("10.231.21.4"));
        assert_eq!(block(SLOTS - 1, MAX_LINKS - 1), ip("10.231.255.228"));
        assert_eq!(free_slot(4, 5, &[]), Some(5));
        // The default route, a VPN's 10/8 and the host's own network do not get in the way.
        let host = prefixes(
            "default via 192.0.2.1 dev eth0\n10.0.0.0/8 via 192.0.2.9 dev eth0\n\
             192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2\n",
        );
        assert_eq!(host[0], (Ipv4Addr::UNSPECIFIED, 0));
        assert_eq!(host.len(), 3);
        assert_eq!(free_slot(4, 5, &host), Some(5));
        // Another run's link in slot 5 (its route, or its address while the link is down),
        // or a local network over it: the next slot.
        let other = prefixes(
            "10.231.21.0/30 dev te1f2h1 proto kernel scope link src 10.231.21.1 linkdown\n",
        );
        assert_eq!(other, [(ip("10.231.21.0"), 30)]);
        assert_eq!(free_slot(100, 5, &other), Some(6));
        // Past its blocks in use the slot is free.
        assert_eq!(free_slot(64, 5, &other), Some(5));
        let addr = prefixes("7: te1f2h0    inet 10.231.20.1/30 scope global te1f2h0\\");
        assert_eq!(free_slot(1, 5, &addr), Some(6));
        let local = prefixes("local 10.231.20.2 dev lo table local proto kernel scope host");
        assert_eq!(free_slot(1, 5, &local), Some(6));
        assert_eq!(free_slot(1, 5, &[(ip("10.231.16.0"), 20)]), Some(8));
        // The last slot wraps around to the first; a pool all in use is refused.
        assert_eq!(
            free_slot(1, SLOTS - 1, &[(ip("10.231.252.0"), 24)]),
            Some(0)
        );
        assert_eq!(free_slot(1, 5, &[(ip("10.231.0.0"), 16)]), None);
    }

    #[test]
    fn tc_statistics_are_read_from_both_lines_of_a_tbf() {
        let text = "qdisc tbf 8001: root refcnt 2 rate 16Kbit burst 2Kb lat 1.5s \n Sent 51234 bytes 312 pkt (dropped 7, overlimits 95 requeues 0) \n backlog 0b 0p requeues 0\n";
        let s = ShapeStats::parse(text);
        assert_eq!(
            s,
            ShapeStats {
                sent_bytes: 51234,
                sent_packets: 312,
                dropped: 7,
                overlimits: 95
            }
        );
        assert!(s.fired());
        let idle = ShapeStats::parse(" Sent 0 bytes 0 pkt (dropped 0, overlimits 0 requeues 0)");
        assert!(!idle.fired());
        assert_eq!(ShapeStats::parse("garbage"), ShapeStats::default());
    }
}
