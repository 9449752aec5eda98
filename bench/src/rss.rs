//! Resident memory of a process and its descendants (nginx's workers, say),
//! read from `/proc/<pid>/status` and `/proc/<pid>/stat`.

/// `VmRSS` in KiB from the text of a status file.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    parse_vm_rss_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// The parent pid from the text of `/proc/<pid>/stat` (the command name may
/// contain spaces and parentheses, so parse after the last `)`).
pub fn parse_ppid(stat: &str) -> Option<u32> {
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` and every process below it.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Some(ppid) =
                std::fs::read_to_string(format!("/proc/{child}/stat")).ok().as_deref().and_then(parse_ppid)
            {
                parents.push((child, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// Summed RSS of `pid` and its descendants.
pub fn tree_rss_kib(pid: u32) -> Option<u64> {
    let tree = process_tree(pid);
    let sizes: Vec<u64> = tree.iter().filter_map(|&p| rss_kib(p)).collect();
    (!sizes.is_empty()).then(|| sizes.iter().sum())
}

/// CPU time in user and in system mode, in clock ticks, from the text of
/// `/proc/<pid>/stat` (the process's threads included).
pub fn parse_user_system_ticks(stat: &str) -> Option<(u64, u64)> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some((fields.get(11)?.parse::<u64>().ok()?, fields.get(12)?.parse::<u64>().ok()?))
}

/// CPU time (user + system) in clock ticks from the text of `/proc/<pid>/stat`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    parse_user_system_ticks(stat).map(|(user, system)| user + system)
}

/// User and system CPU, in clock ticks, of `pid` and every process below it.
pub fn tree_user_system_ticks(pid: u32) -> (u64, u64) {
    process_tree(pid)
        .iter()
        .filter_map(|p| parse_user_system_ticks(&std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?))
        .fold((0, 0), |(u, s), (du, ds)| (u + du, s + ds))
}

/// Clock ticks per second.
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

pub fn cpu_ticks(pid: u32) -> Option<u64> {
    parse_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The CPU a set of named processes spend over a stretch of wall-clock time.
pub struct CpuWindow {
    started: std::time::Instant,
    before: Vec<(String, u32, Option<u64>)>,
}

impl CpuWindow {
    pub fn start(watch: &[(String, u32)]) -> Self {
        let before = watch.iter().map(|(name, pid)| (name.clone(), *pid, cpu_ticks(*pid))).collect();
        CpuWindow { started: std::time::Instant::now(), before }
    }

    /// Each process's CPU over the window, in percent of one core.
    pub fn finish(self) -> serde_json::Map<String, serde_json::Value> {
        let hz = ticks_per_sec();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        self.before
            .into_iter()
            .filter_map(|(name, pid, before)| {
                let used = cpu_ticks(pid)?.checked_sub(before?)? as f64 / hz;
                Some((name, serde_json::json!((used / secs * 1000.0).round() / 10.0)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() {
        assert_eq!(parse_vm_rss_kib("Name:\tx\nVmRSS:\t  12345 kB\nVmSwap: 0 kB\n"), Some(12345));
        assert_eq!(parse_vm_rss_kib("Name: x\n"), None);
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }

    #[test]
    fn parses_ppid_after_the_command_name() {
        assert_eq!(parse_ppid("42 (nginx: worker (x)) S 41 42 42 0"), Some(41));
        assert_eq!(parse_ppid("garbage"), None);
    }

    #[test]
    fn a_process_tree_includes_children() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().expect("sleep");
        let tree = process_tree(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(tree.contains(&child.id()), "{tree:?}");
    }

    #[test]
    fn a_process_trees_cpu_includes_its_descendants() {
        // The busy loop is a grandchild, under a `timeout` that ends it even
        // if this test dies first.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "timeout 2 sh -c 'while :; do :; done'; :"])
            .spawn()
            .expect("sh");
        // Looked at until the grandchild has used a tick, while it runs (at
        // most 40 looks), so a loaded machine only makes this slower.
        let (mut tree, mut own) = (0, 0);
        for _ in 0..40 {
            std::thread::sleep(std::time::Duration::from_millis(40));
            let (user, system) = tree_user_system_ticks(child.id());
            tree = user + system;
            own = std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
                .ok()
                .as_deref()
                .and_then(parse_cpu_ticks)
                .unwrap_or(0);
            if tree > own {
                break;
            }
        }
        let _ = child.wait();
        assert!(tree > own, "tree {tree} ticks, the child alone {own}");
    }

    #[test]
    fn cpu_time_is_user_plus_system_ticks() {
        let stat = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_user_system_ticks(stat), Some((250, 50)));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }
}
