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
}
