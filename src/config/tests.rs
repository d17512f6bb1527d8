use super::*;

const MINIMAL: &str = r#"
[[routes]]
name = "default"
path_prefix = "/"
upstreams = ["127.0.0.1:3000"]
"#;

fn problems(text: &str) -> Vec<ConfigProblem> {
    match Config::parse(text) {
        Ok(_) => Vec::new(),
        Err(ConfigErrors(p)) => p,
    }
}

fn has(problems: &[ConfigProblem], path: &str) -> bool {
    problems.iter().any(|p| p.path == path)
}

#[test]
fn minimal_file_gets_defaults() {
    let config = Config::parse(MINIMAL).expect("valid");
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.server.admin_listen.to_string(), "127.0.0.1:9180");
    assert_eq!(config.keys.prefix, "kg");
    assert_eq!(config.management.path, "/_keygate");
    assert_eq!(config.routes[0].auth, AuthMode::Required);
    assert!(!config.signup.enabled);
}

#[test]
fn shipped_config_is_valid() {
    let text = include_str!("../../config/keygate.toml");
    Config::parse(text).expect("config/keygate.toml must validate");
}

#[test]
fn shipped_postgres_config_is_valid() {
    let text = include_str!("../../config/keygate-postgres.toml");
    let config = Config::parse(text).expect("config/keygate-postgres.toml must validate");
    assert!(matches!(
        config.store.backend,
        StoreBackend::Postgres { .. }
    ));
}

#[test]
fn every_unknown_field_is_reported_with_its_path() {
    let p = problems(
        r#"
[server]
listne = "127.0.0.1:1"
[store]
colour = 1
[[routes]]
name = "a"
upstreams = ["127.0.0.1:3000"]
weight = 3
"#,
    );
    assert!(has(&p, "server.listne"), "{p:?}");
    assert!(has(&p, "store.colour"), "{p:?}");
    assert!(has(&p, "routes[0].weight"), "{p:?}");
    assert!(p.iter().all(|x| x.reason.starts_with("unknown field")));
}

#[test]
fn semantic_problems_are_all_collected() {
    let p = problems(
        r#"
[server]
listen = "not-an-address"
threads = 0
[keys]
prefix = "k_g"
[management]
path = "_keygate/"
[[routes]]
name = "a"
auth = "maybe"
scopes = ["UPPER"]
[[routes]]
name = "a"
path_prefix = "/x"
upstreams = ["127.0.0.1"]
sni = "example.com"
"#,
    );
    for path in [
        "server.listen",
        "server.threads",
        "keys.prefix",
        "management.path",
        "routes[0].upstreams",
        "routes[0].auth",
        "routes[0].scopes[0]",
        "routes[1].name",
        "routes[1].upstreams[0]",
        "routes[1].sni",
    ] {
        assert!(has(&p, path), "missing {path} in {p:?}");
    }
}

#[test]
fn no_routes_and_bad_types_are_errors() {
    assert!(has(&problems("[server]\nthreads = 2\n"), "routes"));
    let p = problems("[server]\nthreads = \"two\"\n");
    assert!(!p.is_empty());
    let p = problems("this is = = not toml");
    assert_eq!(p.len(), 1);
}

#[test]
fn postgres_without_url_env_is_reported() {
    let text = format!("[store]\nbackend = \"postgres\"\n{MINIMAL}");
    assert!(has(&problems(&text), "store.url_env"));
    let text = format!("[store]\nbackend = \"etcd\"\n{MINIMAL}");
    assert!(has(&problems(&text), "store.backend"));
}

#[test]
fn ca_file_problems_are_reported() {
    let dir = tempfile::tempdir().expect("temp dir");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "nothing here").expect("write");
    let route =
        |extra: &str| format!("[[routes]]\nname = \"a\"\nupstreams = [\"127.0.0.1:1\"]\n{extra}\n");
    for extra in [
        "ca_file = \"/no/such/file.pem\"\ntls = true".to_string(),
        format!("ca_file = \"{}\"\ntls = true", garbage.display()),
        format!("ca_file = \"{}\"\ntls = true", empty.display()),
        format!("ca_file = \"{}\"", empty.display()),
    ] {
        assert!(
            has(&problems(&route(&extra)), "routes[0].ca_file"),
            "{extra}"
        );
    }
}

#[test]
fn path_prefixes_must_be_plain_and_hosts_lose_their_root_dot() {
    let route =
        |extra: &str| format!("[[routes]]\nname = \"a\"\nupstreams = [\"127.0.0.1:1\"]\n{extra}\n");
    for prefix in ["/%61dmin", "/a;b", "/a//b", "/a b", "/a\\\\b"] {
        assert!(
            has(
                &problems(&route(&format!("path_prefix = \"{prefix}\""))),
                "routes[0].path_prefix"
            ),
            "{prefix}"
        );
    }
    for prefix in ["/", "/api/v1", "/a-b_c.d~e", "/users/@me", "/x:y"] {
        let text = route(&format!("path_prefix = \"{prefix}\""));
        assert!(Config::parse(&text).is_ok(), "{prefix}");
    }
    for host in ["api.example:8080", "[::1]", "a..b", "", "a b", "a/b"] {
        assert!(
            has(
                &problems(&route(&format!("host = \"{host}\""))),
                "routes[0].host"
            ),
            "{host}"
        );
    }
    let config = Config::parse(&route("host = \"API.Example.\"")).expect("valid");
    assert_eq!(config.routes[0].host.as_deref(), Some("api.example"));
}

#[test]
fn duplicate_route_matchers_are_reported() {
    let text = format!("{MINIMAL}\n[[routes]]\nname = \"b\"\nupstreams = [\"127.0.0.1:3001\"]\n");
    assert!(has(&problems(&text), "routes[1].path_prefix"));
    let text = "[[routes]]\nname = \"a\"\npath_prefix = \"/api\"\nupstreams = [\"127.0.0.1:1\"]\n\
                [[routes]]\nname = \"b\"\npath_prefix = \"/API\"\nupstreams = [\"127.0.0.1:2\"]\n";
    assert!(has(&problems(text), "routes[1].path_prefix"));
}

/// The problems as `keygate check` prints them.
fn lines(text: &str) -> Vec<String> {
    problems(text).iter().map(ToString::to_string).collect()
}

#[test]
fn every_mistake_is_reported_type_errors_included() {
    let p = lines(
        r#"
[server]
shutdown_grace_seconds = "5"
threads = 0
listne = "127.0.0.1:1"
[store]
cache_ttl_seconds = true
[keys]
prefix = "k_g"
[[routes]]
name = "a"
upstreams = ["127.0.0.1:3000", 7]
scope = ["read"]
[[routes]]
name = "b"
path_prefix = "/b"
upstreams = ["127.0.0.1:3001"]
auth = "maybe"
rate_limit = { requests = "ten", window_seconds = 60 }
"#,
    );
    for expected in [
        "server.shutdown_grace_seconds: expected an integer, got a string",
        "server.threads: must be between 1 and 256, got 0",
        "server.listne: unknown field; did you mean \"listen\"?",
        "store.cache_ttl_seconds: expected an integer, got a boolean",
        "keys.prefix: must be 1 to 16 characters of A-Za-z0-9",
        "routes[0].upstreams[1]: expected a string, got an integer",
        "routes[0].scope: unknown field; did you mean \"scopes\"?",
        "routes[1].auth: must be \"required\" or \"none\", got \"maybe\"",
        "routes[1].rate_limit.requests: expected an integer, got a string",
    ] {
        assert!(
            p.iter().any(|l| l == expected),
            "missing {expected:?} in {p:#?}"
        );
    }
    assert_eq!(p.len(), 9, "{p:#?}");
}

#[test]
fn a_field_of_the_wrong_type_is_reported_once() {
    // The stand-in (an empty list, the default name) draws no second problem.
    let p = lines("[[routes]]\nname = 5\nupstreams = \"127.0.0.1:1\"\n");
    assert_eq!(
        p,
        [
            "routes[0].name: expected a string, got an integer",
            "routes[0].upstreams: expected an array of strings, got a string",
        ],
    );
    let p = lines("server = 1\nroutes = \"all\"\n");
    assert_eq!(
        p,
        [
            "server: expected a table, got an integer",
            "routes: expected an array of tables, got a string",
        ],
    );
    let p = lines(&format!("{MINIMAL}rate_limit = {{ requests = 10 }}\n"));
    assert_eq!(
        p,
        ["routes[0].rate_limit.window_seconds: missing (an integer is required)"]
    );
}

#[test]
fn a_syntax_error_has_its_line_and_column() {
    let p = lines("[server]\nthreads = 2\nlisten = = \"x\"\n");
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("(file): not valid TOML at line 3, column 10: "),
        "{p:?}"
    );
    // Columns count characters, not bytes.
    let p = lines("# é\nname = \"é\" x\n");
    assert!(p[0].contains("at line 2, column 12: "), "{p:?}");
}

#[test]
fn unknown_fields_name_the_nearest_known_field_when_close() {
    let p = lines(&format!(
        "[servr]\n[store]\npaht = \"x\"\ncolour = 1\n[management.limits]\nlist_per_minutes = 1\n{MINIMAL}scope = []\nzzz = 1\n"
    ));
    assert_eq!(
        p,
        [
            "store.colour: unknown field",
            "store.paht: unknown field; did you mean \"path\"?",
            "management.limits.list_per_minutes: unknown field; did you mean \"list_per_minute\"?",
            "routes[0].scope: unknown field; did you mean \"scopes\"?",
            "routes[0].zzz: unknown field",
            // The root's own fields are reported once all its tables are read.
            "servr: unknown field; did you mean \"server\"?",
        ],
    );
}

proptest::proptest! {
    #[test]
    fn parse_never_panics(text in "\\PC{0,200}") {
        let _ = Config::parse(&text);
    }

    #[test]
    fn parse_never_panics_on_toml_shaped_input(
        section in proptest::sample::select(vec!["server", "store", "keys", "management", "signup"]),
        field in "[a-z_]{1,24}",
        value in proptest::sample::select(vec!["1", "-1", "\"x\"", "true", "[]", "99999999999999", "\"/\"", "{}"]),
    ) {
        let text = format!("[{section}]\n{field} = {value}\n{MINIMAL}");
        let _ = Config::parse(&text);
    }
}

#[test]
fn postgres_statement_timeout_and_ca_file_are_read_and_checked() {
    let postgres = |extra: &str| {
        format!("[store]\nbackend = \"postgres\"\nurl_env = \"DB\"\n{extra}\n{MINIMAL}")
    };
    let config = Config::parse(&postgres("")).expect("valid");
    let StoreBackend::Postgres {
        statement_timeout,
        ca_certificates,
        ..
    } = config.store.backend
    else {
        panic!("not postgres");
    };
    assert_eq!(statement_timeout, Duration::from_millis(5000));
    assert!(ca_certificates.is_none());

    let dir = tempfile::tempdir().expect("temp dir");
    let ca = dir.path().join("ca.pem");
    let cert = rcgen::generate_simple_self_signed(vec!["db.test".to_string()]).expect("cert");
    std::fs::write(&ca, cert.cert.pem()).expect("write");
    let text = postgres(&format!(
        "statement_timeout_ms = 250\nca_file = \"{}\"",
        ca.display()
    ));
    let StoreBackend::Postgres {
        statement_timeout,
        ca_certificates,
        ..
    } = Config::parse(&text).expect("valid").store.backend
    else {
        panic!("not postgres");
    };
    assert_eq!(statement_timeout, Duration::from_millis(250));
    assert_eq!(ca_certificates, Some(vec![cert.cert.der().to_vec()]));

    for bad in ["statement_timeout_ms = 0", "statement_timeout_ms = 3600001"] {
        assert!(
            has(&problems(&postgres(bad)), "store.statement_timeout_ms"),
            "{bad}"
        );
    }
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "nothing here").expect("write");
    for bad in [
        "ca_file = \"/no/such/ca.pem\"".to_string(),
        format!("ca_file = \"{}\"", empty.display()),
    ] {
        assert!(has(&problems(&postgres(&bad)), "store.ca_file"), "{bad}");
    }
    let sled = format!("[store]\nca_file = \"{}\"\n{MINIMAL}", ca.display());
    assert!(has(&problems(&sled), "store.ca_file"));
}

#[test]
fn decision_only_routes_need_upstreams_written_out_as_empty() {
    let decisions = "[[routes]]\nname = \"d\"\nupstreams = []\ndecision_cache_seconds = 30\n";
    let config = Config::parse(decisions).expect("`upstreams = []` is a decision-only route");
    assert!(config.routes[0].upstreams.is_empty());
    assert_eq!(config.routes[0].decision_cache_seconds, 30);
    let missing = problems("[[routes]]\nname = \"d\"\n");
    assert!(has(&missing, "routes[0].upstreams"), "{missing:?}");
    for bad in ["-1", "3601"] {
        let p = problems(&format!(
            "[[routes]]\nname = \"d\"\nupstreams = []\ndecision_cache_seconds = {bad}\n"
        ));
        assert!(has(&p, "routes[0].decision_cache_seconds"), "{bad}: {p:?}");
    }
}

#[test]
fn the_cache_warm_up_defaults_to_the_cache_capacity_and_cannot_exceed_it() {
    let store = |extra: &str| format!("[store]\ncache_capacity = 500\n{extra}\n{MINIMAL}");
    let config = Config::parse(&store("")).expect("valid");
    assert_eq!(config.store.cache_warm_keys, 500);
    let config = Config::parse(&store("cache_warm_keys = 0")).expect("valid");
    assert_eq!(config.store.cache_warm_keys, 0, "0 turns the warm-up off");
    let config = Config::parse(&store("cache_warm_keys = 120")).expect("valid");
    assert_eq!(config.store.cache_warm_keys, 120);
    for bad in ["cache_warm_keys = 501", "cache_warm_keys = -1"] {
        let p = problems(&store(bad));
        assert!(has(&p, "store.cache_warm_keys"), "{bad}: {p:?}");
    }
    let p = problems(&store("cache_warm_keys = 501"));
    assert!(
        p.iter()
            .any(|p| p.reason.contains("store.cache_capacity (500)")),
        "{p:?}"
    );
}
