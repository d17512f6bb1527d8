//! A real nginx (Debian's `nginx-light`, which `.ci/setup` installs) on a free loopback
//! port, with a config of the test's, in a temp dir; stopped on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) struct Nginx {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

/// The nginx binary; fails the test, saying what to install, when there is none.
fn binary() -> &'static str {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!(
                "nginx is not installed: these tests need a real nginx with the auth_request \
                 module (`apt-get install nginx-light`, as .ci/setup does)"
            )
        })
}

impl Nginx {
    /// Starts nginx with `http_block` (the inside of `http { }`, which may use `{port}`,
    /// the port nginx should listen on) and waits until it accepts connections.
    pub(crate) fn start(http_block: &str) -> Nginx {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = super::free_port();
        let d = dir.path().display();
        let conf = format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{}\n}}\n",
            http_block.replace("{port}", &port.to_string())
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).expect("write nginx.conf");
        let child = Command::new(binary())
            .args([
                "-p",
                dir.path().to_str().expect("utf-8 path"),
                "-c",
                path.to_str().expect("utf-8 path"),
                "-g",
                "daemon off;",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("stderr.log")).expect("log file"),
            ))
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Nginx {
            child,
            port,
            _dir: dir,
        };
        nginx.wait_ready();
        nginx
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nginx exited during start-up ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// nginx's stderr and error log, for failure messages.
    pub(crate) fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self._dir.path().join(name));
        format!(
            "{}{}",
            read("stderr.log").unwrap_or_default(),
            read("error.log").unwrap_or_default()
        )
    }

    pub(crate) fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its workers; SIGKILL would orphan them.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
