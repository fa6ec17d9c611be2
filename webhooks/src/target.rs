//! Target URLs: what may be called, and the HTTP client that calls them.
//!
//! Unless `allow_private_targets`, a target must not be (or resolve to) a
//! loopback, private, link-local, shared or otherwise non-public address:
//! checked on the URL when a subscription is saved (IP literals and
//! `localhost` names) and on every connection by the client's resolver
//! (names, whatever they resolve to at that moment), so a name re-pointed
//! at an internal address later is refused too. Redirects are not
//! followed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use crate::{Settings, WebhookError};

/// Longest target URL accepted.
const MAX_URL: usize = 2048;

/// Checks a target URL; returns it normalised.
pub(crate) fn check_url(raw: &str, allow_private: bool) -> Result<String, WebhookError> {
    let invalid = |m: String| WebhookError::Invalid(m);
    if raw.len() > MAX_URL {
        return Err(invalid(format!(
            "url: at most {MAX_URL} characters are allowed"
        )));
    }
    let url = url::Url::parse(raw.trim())
        .map_err(|e| invalid(format!("url: {raw:?} is not an absolute URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "url: the scheme must be http or https, not {:?}",
            url.scheme()
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "url: credentials in the URL are not supported; verify the Dockyard-Signature header instead"
                .into(),
        ));
    }
    let host = match url.host() {
        Some(h) => h,
        None => return Err(invalid("url: a host is required".into())),
    };
    if !allow_private {
        let refused = match host {
            url::Host::Ipv4(ip) => !is_public(IpAddr::V4(ip)),
            url::Host::Ipv6(ip) => !is_public(IpAddr::V6(ip)),
            url::Host::Domain(d) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                d == "localhost" || d.ends_with(".localhost")
            }
        };
        if refused {
            return Err(invalid(format!(
                "url: {host} is a loopback or private address; targets must be public \
                 (an operator can set webhooks.allow_private_targets)"
            )));
        }
    }
    Ok(url.to_string())
}

/// Whether `ip` is a public unicast address.
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // unique local fc00::/7
                || (s[0] & 0xfe00) == 0xfc00
                // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfe80
                // site-local fec0::/10 (deprecated)
                || (s[0] & 0xffc0) == 0xfec0
                // documentation 2001:db8::/32
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                // IPv4-compatible / NAT64 well-known prefix 64:ff9b::/96 maps to v4
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] && {
                    let v4 = Ipv4Addr::new(
                        (s[6] >> 8) as u8,
                        s[6] as u8,
                        (s[7] >> 8) as u8,
                        s[7] as u8,
                    );
                    !is_public_v4(v4)
                }))
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        // "this network" 0.0.0.0/8
        || o[0] == 0
        // shared address space (CGNAT) 100.64.0.0/10
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        // IETF protocol assignments 192.0.0.0/24
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        // benchmarking 198.18.0.0/15
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        // reserved 240.0.0.0/4
        || o[0] >= 240)
}

/// A resolver that drops non-public addresses, so a name that resolves to
/// an internal address cannot be called.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = all.into_iter().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(format!(
                    "{host} resolves to no public address (webhooks.allow_private_targets is off)"
                )
                .into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The client deliveries are made with.
pub(crate) fn client(settings: &Settings) -> Result<reqwest::Client, WebhookError> {
    let mut b = reqwest::Client::builder()
        .user_agent(format!("Dockyard-Webhooks/{}", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(settings.timeout)
        .timeout(settings.timeout)
        .pool_max_idle_per_host(4);
    if !settings.allow_private_targets {
        b = b.dns_resolver(Arc::new(PublicOnly));
    }
    b.build().map_err(|e| WebhookError::Client(e.to_string()))
}

/// Whether the URL's host is an IP literal that may not be called (the
/// resolver never sees literals).
pub(crate) fn literal_refused(url: &str, allow_private: bool) -> bool {
    if allow_private {
        return false;
    }
    match url::Url::parse(url)
        .ok()
        .and_then(|u| u.host().map(|h| h.to_owned()))
    {
        Some(url::Host::Ipv4(ip)) => !is_public(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => !is_public(IpAddr::V6(ip)),
        Some(url::Host::Domain(_)) => false,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_and_private_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} is not public");
        }
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("https://hooks.example.com/x?a=1", false).is_ok());
        assert!(check_url("http://93.184.216.34:8080/", false).is_ok());
        for (bad, why) in [
            ("ftp://example.com/", "scheme"),
            ("not a url", "not an absolute URL"),
            ("http://user:pw@example.com/", "credentials"),
            ("http://127.0.0.1:9/", "private"),
            ("http://[::1]/", "private"),
            ("http://localhost:8080/", "private"),
            ("http://api.localhost/", "private"),
            ("http://10.0.0.1/", "private"),
            ("http://169.254.169.254/latest/meta-data", "private"),
        ] {
            let e = check_url(bad, false).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(check_url("http://127.0.0.1:9/", true).is_ok());
        assert!(literal_refused("http://127.0.0.1:9/", false));
        assert!(!literal_refused("http://127.0.0.1:9/", true));
        assert!(!literal_refused("http://hooks.example.com/", false));
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_of_private_addresses() {
        use reqwest::dns::Resolve;
        let r = PublicOnly.resolve("localhost".parse().unwrap()).await;
        let e = r.err().expect("localhost refused").to_string();
        assert!(e.contains("no public address"), "{e}");
    }
}
