//! A name server the test controls, on a loopback UDP port: it answers every A question
//! with the addresses it is told now, or SERVFAIL while told to fail. Just enough DNS
//! (RFC 1035 4.1) for keygate's resolver to move an upstream name from one address to
//! another under a test.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

const TYPE_A: u16 = 1;
const RCODE_SERVFAIL: u8 = 2;

/// None: answer SERVFAIL.
type Answers = Arc<Mutex<Option<Vec<Ipv4Addr>>>>;

pub(crate) struct TestDns {
    pub addr: SocketAddr,
    answers: Answers,
    task: tokio::task::JoinHandle<()>,
}

impl TestDns {
    pub(crate) async fn start(addrs: &[Ipv4Addr]) -> TestDns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind DNS");
        let addr = socket.local_addr().expect("DNS address");
        let answers: Answers = Arc::new(Mutex::new(Some(addrs.to_vec())));
        let shared = Arc::clone(&answers);
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let now = shared.lock().expect("lock").clone();
                if let Some(reply) = answer(&buf[..n], now.as_deref()) {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        TestDns {
            addr,
            answers,
            task,
        }
    }

    /// From now on, every name has `addrs`.
    pub(crate) fn set(&self, addrs: &[Ipv4Addr]) {
        *self.answers.lock().expect("lock") = Some(addrs.to_vec());
    }

    /// From now on, every question gets SERVFAIL.
    pub(crate) fn fail(&self) {
        *self.answers.lock().expect("lock") = None;
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reply to one query: its id and question echoed, then an A record per address when
/// the question asks for A (none for any other type), TTL 1 s.
fn answer(query: &[u8], addrs: Option<&[Ipv4Addr]>) -> Option<Vec<u8>> {
    let header = query.get(..12)?;
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + usize::from(query[end]);
    }
    let question = query.get(12..end + 5)?;
    let qtype = u16::from_be_bytes([query[end + 1], query[end + 2]]);
    let (rcode, records) = match addrs {
        None => (RCODE_SERVFAIL, &[][..]),
        Some(addrs) if qtype == TYPE_A => (0, addrs),
        Some(_) => (0, &[][..]),
    };
    let mut reply = Vec::with_capacity(64 + 16 * records.len());
    reply.extend_from_slice(&header[..2]);
    // QR, the query's RD, RA; then the rcode.
    reply.push(0x80 | (header[2] & 0x01));
    reply.push(0x80 | rcode);
    reply.extend_from_slice(&1u16.to_be_bytes());
    reply.extend_from_slice(&u16::try_from(records.len()).ok()?.to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    for addr in records {
        // The name as a pointer to the question's, type A, class IN, TTL, length 4.
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4]);
        reply.extend_from_slice(&addr.octets());
    }
    Some(reply)
}
