//! Steps 1 to 3 of the request path: where a request's path leads (the management API, a
//! route, or nowhere), and the refusal of a path that an upstream could read as leading
//! somewhere else (see `http::path` for the readings).

use std::sync::Arc;

use pingora::http::RequestHeader;

use crate::error::GatewayError;
use crate::http::host::request_host;
use crate::http::path;
use crate::routing::{Route, Router};
use crate::state::Live;

/// What a path means to keygate. Routes compare by index.
pub(super) enum Destination<'a> {
    Management,
    Route(usize, &'a Arc<Route>),
    NoRoute,
}

impl Destination<'_> {
    fn same_as(&self, other: &Destination<'_>) -> bool {
        match (self, other) {
            (Destination::Management, Destination::Management)
            | (Destination::NoRoute, Destination::NoRoute) => true,
            (Destination::Route(a, _), Destination::Route(b, _)) => a == b,
            _ => false,
        }
    }
}

/// What one request's path is matched against: the routes and the management mount of the
/// configuration it arrived under.
pub(super) struct Destinations<'a> {
    router: &'a Router,
    management_path: &'a str,
    /// Whether a route prefix or the management path has an upper-case letter (then every
    /// path is also compared regardless of case; otherwise only paths with one).
    case_matters: bool,
}

impl<'a> Destinations<'a> {
    pub(super) fn of(live: &'a Live) -> Self {
        let management_path = live.config.management.path.as_str();
        Destinations {
            router: &live.router,
            management_path,
            case_matters: live.router.has_uppercase_prefixes()
                || management_path.bytes().any(|b| b.is_ascii_uppercase()),
        }
    }

    /// Where a request in origin-form leads, once its path is known to read the same to
    /// keygate and to any upstream.
    pub(super) fn destination_of(
        &self,
        req: &RequestHeader,
    ) -> Result<Destination<'a>, GatewayError> {
        let path = req.uri.path();
        // Without host-bound routes the Host header decides nothing here.
        let host = if self.router.has_host_routes() {
            request_host(req).map_err(|_| GatewayError::InvalidHost)?
        } else {
            None
        };
        let lenient = path::lenient_reading(path).map_err(|_| GatewayError::InvalidPath)?;
        let as_read = lenient.as_deref().unwrap_or(path);
        // `//x/...` is a URL with host `x` to some upstream parsers.
        if path.contains('\\') || path::leads_with_authority(path) || path::has_dot_segment(as_read)
        {
            return Err(GatewayError::InvalidPath);
        }
        let suffixed = path::suffix_reading(as_read);
        let destination = self.destination(host, path, false);
        // Where no route takes the path as sent, nothing is forwarded: 404 whatever the
        // other readings say.
        if !matches!(destination, Destination::NoRoute)
            && self.reads_elsewhere(
                host,
                &destination,
                [lenient.as_deref(), suffixed.as_deref()],
                as_read,
            )
        {
            return Err(GatewayError::AmbiguousPath);
        }
        if let Destination::Route(_, route) = &destination
            && route
                .stripped_rest(path)
                .is_some_and(path::leads_with_authority)
        {
            // On a strip_prefix route the upstream sees only the rest: it must not look
            // like an authority either (`/api//evil.example/x`).
            return Err(GatewayError::InvalidPath);
        }
        Ok(destination)
    }

    /// Whether one of the other `readings` (lenient, suffix), or a comparison regardless
    /// of case, leads somewhere other than `destination`.
    fn reads_elsewhere(
        &self,
        host: Option<&str>,
        destination: &Destination<'_>,
        readings: [Option<&str>; 2],
        as_read: &str,
    ) -> bool {
        let elsewhere = |read: &str, ignore_case| {
            !self
                .destination(host, read, ignore_case)
                .same_as(destination)
        };
        // The lenient reading can make letters of escapes (`%2541` reads as `A`).
        let compare_case = self.case_matters || as_read.bytes().any(|b| b.is_ascii_uppercase());
        readings
            .into_iter()
            .flatten()
            .any(|read| elsewhere(read, false))
            || (compare_case && elsewhere(as_read, true))
    }

    /// Where `path` leads: the management API, a route, or nowhere; with `ignore_case`,
    /// where it leads for an upstream that compares paths regardless of case.
    fn destination(&self, host: Option<&str>, path: &str, ignore_case: bool) -> Destination<'a> {
        if self.is_management_path(path, ignore_case) {
            return Destination::Management;
        }
        let router = self.router;
        let found = if ignore_case {
            router.find_ignoring_case(host, path)
        } else {
            router.find(host, path)
        };
        match found {
            Some((index, route)) => Destination::Route(index, route),
            None => Destination::NoRoute,
        }
    }

    fn is_management_path(&self, path: &str, ignore_case: bool) -> bool {
        management_rest(self.management_path, path, ignore_case).is_some()
    }
}

/// What follows the management mount `base` in `path` (`""` for the mount itself), when
/// `path` is under it on whole segments.
pub(crate) fn management_rest<'p>(base: &str, path: &'p str, ignore_case: bool) -> Option<&'p str> {
    let head = path.as_bytes().get(..base.len())?;
    let same = if ignore_case {
        head.eq_ignore_ascii_case(base.as_bytes())
    } else {
        head == base.as_bytes()
    };
    let rest = path.get(base.len()..)?;
    (same && (rest.is_empty() || rest.starts_with('/'))).then_some(rest)
}
