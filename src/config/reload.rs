//! What a reload may change (contract section 10): everything but the fields below, which
//! a running gateway cannot take over (its sockets, its threads, its store, and the names
//! that keys and callers were already given). A reloaded file's values for those are
//! reported and set aside until the next start.

use super::Config;

impl Config {
    /// The restart-only fields whose value in `self` (a file just read) differs from the
    /// `running` configuration, by field path.
    pub fn restart_required(&self, running: &Config) -> Vec<&'static str> {
        let (new, old) = (self, running);
        let changed = [
            ("server.listen", new.server.listen != old.server.listen),
            (
                "server.admin_listen",
                new.server.admin_listen != old.server.admin_listen,
            ),
            ("server.threads", new.server.threads != old.server.threads),
            ("store", new.store != old.store),
            ("ratelimit", new.ratelimit != old.ratelimit),
            ("keys.prefix", new.keys.prefix != old.keys.prefix),
            (
                "management.path",
                new.management.path != old.management.path,
            ),
            (
                "management.admin_token_env",
                new.management.admin_token_env != old.management.admin_token_env,
            ),
        ];
        changed
            .into_iter()
            .filter_map(|(path, differs)| differs.then_some(path))
            .collect()
    }

    /// `self` with `running`'s values for the restart-only fields, so that the
    /// configuration in force always describes what actually runs.
    #[must_use]
    pub fn keeping_restart_fields(mut self, running: &Config) -> Config {
        self.server.listen = running.server.listen;
        self.server.admin_listen = running.server.admin_listen;
        self.server.threads = running.server.threads;
        self.store = running.store.clone();
        self.ratelimit = running.ratelimit.clone();
        self.keys.prefix.clone_from(&running.keys.prefix);
        self.management.path.clone_from(&running.management.path);
        self.management
            .admin_token_env
            .clone_from(&running.management.admin_token_env);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::Config;

    fn config(server: &str, extra: &str) -> Config {
        let text = format!(
            "[server]\n{server}\n[store]\nbackend = \"sled\"\npath = \"/tmp/x\"\n{extra}\n[[routes]]\nname = \"a\"\npath_prefix = \"/\"\nupstreams = [\"127.0.0.1:1\"]\n"
        );
        Config::parse(&text).expect("valid")
    }

    #[test]
    fn only_restart_fields_are_reported_and_they_keep_their_running_values() {
        let running = config("listen = \"127.0.0.1:8080\"\nthreads = 2", "");
        let read = config(
            "listen = \"127.0.0.1:9090\"\nthreads = 4\nmax_connections = 7",
            "[keys]\nprefix = \"other\"",
        );
        assert_eq!(
            read.restart_required(&running),
            ["server.listen", "server.threads", "keys.prefix"]
        );
        let applied = read.keeping_restart_fields(&running);
        assert_eq!(applied.server.listen, running.server.listen);
        assert_eq!(applied.server.threads, 2);
        assert_eq!(applied.keys.prefix, running.keys.prefix);
        assert_eq!(applied.server.max_connections, 7, "live fields are taken");
        assert!(applied.restart_required(&running).is_empty());
    }
}
