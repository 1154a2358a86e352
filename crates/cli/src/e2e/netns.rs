//! `--netns`: each worker in a network namespace of its own, joined to the host by a veth pair
//! (`10.231.{i}.1` on the host side, `10.231.{i}.2` in the namespace), so that faults can be
//! made by the kernel: `link_down` takes the host end of a worker's veth down, and TCP sees a
//! silent path (no FIN, no RST, retransmissions until the link is back). Needs root and
//! iproute2. Everything created is named after this process and removed on drop.
//!
//! `tc netem` (kernel delay and loss) would fit here too; the kernels this was built on do not
//! provide the `netem` qdisc, so it is not used.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, bail};

/// Most namespaces one run creates (one address block each).
pub const MAX_LINKS: usize = 250;

/// One worker's namespace and veth pair.
#[derive(Debug, Clone)]
pub struct Link {
    pub ns: String,
    pub host_if: String,
    pub host_ip: Ipv4Addr,
}

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
    let _ = ip(&["netns", "del", &probe]);
    Ok(())
}

impl NetFleet {
    /// Creates `n` namespaces with their veth pairs, up and addressed.
    pub fn create(n: usize) -> anyhow::Result<Self> {
        if n > MAX_LINKS {
            bail!("at most {MAX_LINKS} workers in namespaces");
        }
        let pid = std::process::id();
        let mut fleet = NetFleet::default();
        for i in 0..n {
            let link = Link {
                ns: format!("tether-{pid}-{i}"),
                // Interface names have at most 15 bytes.
                host_if: format!("te{pid:x}h{i}"),
                host_ip: Ipv4Addr::new(10, 231, i as u8, 1),
            };
            let peer = format!("te{pid:x}w{i}");
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
            inner(&["addr", "add", &format!("10.231.{i}.2/30"), "dev", &peer])?;
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
