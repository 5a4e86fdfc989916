//! Which routes could match a request, found without trying them all.
//!
//! Routes keep their first-match order; the index only narrows the list. Each route is
//! filed under the one condition it cannot match without: its exact host, else its service
//! (by the authority's first label), else nothing; and under that, its exact path, path
//! prefix or path segments, else nothing. A request gathers the routes filed under its own
//! host, its first label and "any host", and in each of those under its path, the prefixes
//! of its path that some route names, and its segment prefixes. Those candidates, in route
//! order, are then tried in full: a route left out could not have matched, so the first
//! candidate that matches is the route a scan of every route would have found. The cost
//! grows with the path's length and the number of distinct prefix lengths, not with the
//! number of routes.

use std::collections::HashMap;

use crate::{PathMatch, Route};

/// The routes of one host key, filed by their path condition.
#[derive(Debug, Default)]
struct PathIndex {
    exact: HashMap<String, Vec<u32>>,
    prefix: HashMap<String, Vec<u32>>,
    /// The lengths of the keys of `prefix`, ascending, without repeats.
    prefix_lens: Vec<usize>,
    /// By the prefix with its trailing `/` trimmed (`""` for `/`: every path).
    segments: HashMap<String, Vec<u32>>,
    /// Routes with no path condition, or a regex.
    other: Vec<u32>,
}

impl PathIndex {
    fn add(&mut self, i: u32, path: Option<&PathMatch>) {
        match path {
            Some(PathMatch::Exact(p)) => self.exact.entry(p.clone()).or_default().push(i),
            Some(PathMatch::Prefix(p)) => {
                self.prefix.entry(p.clone()).or_default().push(i);
                if let Err(at) = self.prefix_lens.binary_search(&p.len()) {
                    self.prefix_lens.insert(at, p.len());
                }
            }
            Some(PathMatch::Segments(p)) => self
                .segments
                .entry(p.trim_end_matches('/').to_owned())
                .or_default()
                .push(i),
            Some(PathMatch::Regex(_)) | None => self.other.push(i),
        }
    }

    /// Appends the routes whose path condition `path` (query excluded) may meet.
    fn collect(&self, path: &str, out: &mut Vec<u32>) {
        out.extend_from_slice(&self.other);
        if let Some(v) = self.exact.get(path) {
            out.extend_from_slice(v);
        }
        for &n in &self.prefix_lens {
            if n > path.len() {
                break;
            }
            if let Some(v) = path.get(..n).and_then(|p| self.prefix.get(p)) {
                out.extend_from_slice(v);
            }
        }
        if !self.segments.is_empty() {
            // `/a/b` meets the segments `` (`/`), `/a` and `/a/b`.
            let ends = path
                .bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'/')
                .map(|(at, _)| at)
                .chain(std::iter::once(path.len()));
            for end in ends {
                if let Some(v) = self.segments.get(&path[..end]) {
                    out.extend_from_slice(v);
                }
            }
        }
    }
}

/// The routes of a configuration, filed by host and path.
#[derive(Debug, Default)]
pub struct RouteIndex {
    /// Routes with `match.host`, by the host in lower case.
    by_host: HashMap<String, PathIndex>,
    /// Routes with `match.service` (a name without a dot), by that name in lower case.
    by_service: HashMap<String, PathIndex>,
    /// Every other route.
    any_host: PathIndex,
}

impl RouteIndex {
    /// Files `routes`.
    pub fn new(routes: &[Route]) -> Self {
        let mut index = Self::default();
        for (i, r) in routes.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            let m = &r.matcher;
            let paths = if let Some(host) = &m.host {
                index.by_host.entry(host.to_ascii_lowercase()).or_default()
            } else if let Some(service) = m.service.as_ref().filter(|s| !s.contains('.')) {
                index
                    .by_service
                    .entry(service.to_ascii_lowercase())
                    .or_default()
            } else {
                &mut index.any_host
            };
            paths.add(i, m.path.as_ref());
        }
        index
    }

    /// The indices of the routes that may match a request for `path` (query excluded) and
    /// the authority `authority()` gives (asked only if some route names a host or a
    /// service), ascending, into `out` (cleared first).
    pub fn candidates<'r>(
        &self,
        authority: impl FnOnce() -> &'r str,
        path: &str,
        out: &mut Vec<u32>,
    ) {
        out.clear();
        self.any_host.collect(path, out);
        if !self.by_host.is_empty() || !self.by_service.is_empty() {
            let authority = authority();
            if let Some(p) = self.by_host.get(&authority.to_ascii_lowercase()) {
                p.collect(path, out);
            }
            if let Some(p) = self.by_service.get(&first_label(authority)) {
                p.collect(path, out);
            }
        }
        out.sort_unstable();
        out.dedup();
    }
}

/// The authority's host up to its first dot, port and trailing dot left out, in lower case:
/// a service name matches an authority only if it equals this (see `names_service`).
fn first_label(authority: &str) -> String {
    let host = match authority.rsplit_once(':') {
        Some((h, p))
            if !h.ends_with(']') && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) =>
        {
            h
        }
        _ => authority,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    host.split('.').next().unwrap_or(host).to_ascii_lowercase()
}
