//! Where Redis is. Either one server, `redis://[:password@]host:port[/db]`,
//! or a service watched by Redis Sentinel,
//! `redis+sentinel://[:password@]host1:26379,host2:26379/service[/db]` (the
//! password and db are for the data nodes; the sentinels are asked without
//! one). With Sentinel, every new connection asks the sentinels for the
//! current master (redis-rs's `SentinelClient`), and a program marks its
//! connections stale after a Redis error so the next use reconnects to
//! whichever server is master by then: the registry, the backplane and
//! history writes follow a failover by themselves.

use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Client, ErrorKind, RedisConnectionInfo, RedisError, RedisResult};

const SENTINEL_SCHEME: &str = "redis+sentinel://";

pub enum RedisTarget {
    Direct(Client),
    Sentinel { sentinels: tokio::sync::Mutex<SentinelClient>, service: String },
}

fn invalid(why: String) -> RedisError {
    RedisError::from((ErrorKind::InvalidClientConfig, "invalid Redis Sentinel URL", why))
}

impl RedisTarget {
    /// Parses a Redis or Redis Sentinel URL (nothing is contacted yet).
    pub fn open(url: &str) -> RedisResult<Self> {
        let Some(rest) = url.strip_prefix(SENTINEL_SCHEME) else { return Client::open(url).map(RedisTarget::Direct) };
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, rest),
        };
        let (hosts, path) = rest.split_once('/').ok_or_else(|| invalid("no /service after the sentinels".into()))?;
        let mut parts = path.split('/');
        let service = parts.next().filter(|s| !s.is_empty()).ok_or_else(|| invalid("no service name".into()))?;
        let db: i64 = match parts.next().filter(|d| !d.is_empty()) {
            Some(d) => d.parse().map_err(|_| invalid(format!("{d:?} is not a database number")))?,
            None => 0,
        };
        let sentinels: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| if h.contains(':') { format!("redis://{h}") } else { format!("redis://{h}:26379") })
            .collect();
        if sentinels.is_empty() {
            return Err(invalid("no sentinel addresses".into()));
        }
        let mut info = RedisConnectionInfo::default().set_db(db);
        if let Some(auth) = auth {
            // `user:password` or `:password`, percent-decoding left to the user.
            let password = auth.split_once(':').map_or(auth, |(_, p)| p);
            if !password.is_empty() {
                info = info.set_password(password);
            }
        }
        let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
        let client = SentinelClient::build(sentinels, service.to_string(), Some(node), SentinelServerType::Master)?;
        Ok(RedisTarget::Sentinel { sentinels: tokio::sync::Mutex::new(client), service: service.to_string() })
    }

    /// A client for the server to use now: the one server, or the master the
    /// sentinels name at this moment (asking them takes at most `within`).
    pub async fn client(&self, within: std::time::Duration) -> RedisResult<Client> {
        match self {
            RedisTarget::Direct(c) => Ok(c.clone()),
            RedisTarget::Sentinel { sentinels, .. } => {
                let asked = tokio::time::timeout(within, async { sentinels.lock().await.async_get_client().await });
                asked.await.map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
            }
        }
    }

    /// Whether connections must be made again after an error (the master
    /// may have moved).
    pub fn follows_failover(&self) -> bool {
        matches!(self, RedisTarget::Sentinel { .. })
    }
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        match self {
            RedisTarget::Direct(c) => write!(f, "redis {}", c.get_connection_info().addr()),
            RedisTarget::Sentinel { service, .. } => write!(f, "redis sentinel service {service}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_of_both_kinds_parse_and_bad_ones_do_not() {
        assert!(matches!(RedisTarget::open("redis://127.0.0.1:6379").unwrap(), RedisTarget::Direct(_)));
        let s = RedisTarget::open("redis+sentinel://:secret@h1:26379,h2/mymaster/2").unwrap();
        assert!(s.follows_failover());
        assert!(!format!("{s:?}").contains("secret"));
        for bad in [
            "redis+sentinel://h1:26379",
            "redis+sentinel://h1:26379/",
            "redis+sentinel:///m",
            "redis+sentinel://h/m/x",
            "nope://x",
        ] {
            assert!(RedisTarget::open(bad).is_err(), "{bad}");
        }
    }
}
