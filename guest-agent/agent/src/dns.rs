//! The embedded DNS server of user-defined networks: on each network's gateway address (port
//! 53, UDP and TCP) it answers the names berthd registered for that network (container names,
//! aliases, compose service names, short ids) with A records, and forwards every other
//! question to the uplink's forwarder, relaying its answer unchanged.
//!
//! Only the question section of a query is read (RFC 1035 §4.1): a standard query with one
//! question. Anything else is forwarded as-is, or answered SERVFAIL if forwarding fails.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use agent_protocol::network::UPLINK_DNS;

use crate::log::console;

/// How long the upstream forwarder may take to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to live of the answers, in seconds: names change as containers come and go.
const ANSWER_TTL: u32 = 600;
/// The largest DNS message over UDP handled here (EDNS0 sizes included).
const MAX_MESSAGE: usize = 4096;

const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const RCODE_SERVFAIL: u8 = 2;

/// Names and their addresses, per network gateway.
type Tables = HashMap<Ipv4Addr, HashMap<String, Vec<Ipv4Addr>>>;

/// Names per network gateway, and the server threads already listening.
/// Clones share the tables.
#[derive(Debug, Default, Clone)]
pub struct EmbeddedDns {
    tables: Arc<Mutex<Tables>>,
}

impl EmbeddedDns {
    /// Replaces the names of the network whose gateway is `gateway`, and starts its server if
    /// none listens there yet.
    pub fn set_names(&self, gateway: Ipv4Addr, names: &[(String, Ipv4Addr)]) -> io::Result<()> {
        let mut table: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
        for (name, address) in names {
            let entry = table.entry(normalise(name)).or_default();
            if !entry.contains(address) {
                entry.push(*address);
            }
        }
        let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        let first = tables.insert(gateway, table).is_none();
        if first {
            if let Err(e) = self.spawn_server(gateway) {
                tables.remove(&gateway);
                return Err(e);
            }
        }
        Ok(())
    }

    fn spawn_server(&self, gateway: Ipv4Addr) -> io::Result<()> {
        let socket = UdpSocket::bind((gateway, 53))?;
        let listener = TcpListener::bind((gateway, 53))?;
        let tables = Arc::clone(&self.tables);
        thread::Builder::new()
            .name("dns".into())
            .spawn(move || serve(&socket, gateway, &tables))?;
        let tables = Arc::clone(&self.tables);
        thread::Builder::new()
            .name("dns-tcp".into())
            .spawn(move || serve_tcp(&listener, gateway, &tables))
            .map(drop)
    }
}

/// DNS over TCP (RFC 1035 §4.2.2: each message after a big-endian `u16` length), for
/// resolvers that retry truncated answers over TCP. A thread per connection.
fn serve_tcp(listener: &TcpListener, gateway: Ipv4Addr, tables: &Arc<Mutex<Tables>>) {
    loop {
        let connection = match listener.accept() {
            Ok((connection, _)) => connection,
            Err(e) => {
                console!("embedded DNS over TCP on {gateway}: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let tables = Arc::clone(tables);
        let spawned = thread::Builder::new()
            .name("dns-tcp-conn".into())
            .spawn(move || {
                let _ = connection.set_read_timeout(Some(UPSTREAM_TIMEOUT));
                let _ = answer_tcp(connection, gateway, &tables);
            });
        if let Err(e) = spawned {
            console!("cannot start a DNS connection thread: {e}");
        }
    }
}

/// Answers every query on one TCP connection until the client closes it.
fn answer_tcp(
    mut connection: TcpStream,
    gateway: Ipv4Addr,
    tables: &Mutex<Tables>,
) -> io::Result<()> {
    loop {
        let mut length = [0u8; 2];
        match connection.read_exact(&mut length) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(length))];
        connection.read_exact(&mut query)?;
        let local = {
            let tables = tables.lock().unwrap_or_else(PoisonError::into_inner);
            tables.get(&gateway).and_then(|t| answer_local(&query, t))
        };
        let answer =
            local.unwrap_or_else(|| ask_upstream(&query).unwrap_or_else(|_| servfail(&query)));
        let Ok(len) = u16::try_from(answer.len()) else {
            return Ok(());
        };
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&answer);
        connection.write_all(&framed)?;
    }
}

fn serve(socket: &UdpSocket, gateway: Ipv4Addr, tables: &Mutex<Tables>) {
    let mut buffer = vec![0u8; MAX_MESSAGE];
    loop {
        let (len, client) = match socket.recv_from(&mut buffer) {
            Ok(received) => received,
            Err(e) => {
                console!("embedded DNS on {gateway}: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let query = buffer[..len].to_vec();
        let local = {
            let tables = tables.lock().unwrap_or_else(PoisonError::into_inner);
            tables.get(&gateway).and_then(|t| answer_local(&query, t))
        };
        match local {
            Some(answer) => {
                let _ = socket.send_to(&answer, client);
            }
            // Forwarding waits on the network: a thread per question keeps others moving.
            None => {
                let reply = socket.try_clone();
                let spawned = thread::Builder::new()
                    .name("dns-forward".into())
                    .spawn(move || {
                        if let Ok(reply) = reply {
                            forward(&reply, &query, client);
                        }
                    });
                if let Err(e) = spawned {
                    console!("cannot start a DNS forwarding thread: {e}");
                }
            }
        }
    }
}

fn forward(reply: &UdpSocket, query: &[u8], client: SocketAddr) {
    let answer = ask_upstream(query).unwrap_or_else(|_| servfail(query));
    if !answer.is_empty() {
        let _ = reply.send_to(&answer, client);
    }
}

fn ask_upstream(query: &[u8]) -> io::Result<Vec<u8>> {
    let socket = UdpSocket::bind(("0.0.0.0", 0))?;
    socket.set_read_timeout(Some(UPSTREAM_TIMEOUT))?;
    socket.connect((UPLINK_DNS, 53))?;
    socket.send(query)?;
    let mut buffer = vec![0u8; MAX_MESSAGE];
    let len = socket.recv(&mut buffer)?;
    buffer.truncate(len);
    Ok(buffer)
}

/// Lowercase, without the root's trailing dot.
fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A parsed question: the name, its type, and where the question section ends.
#[derive(Debug, PartialEq, Eq)]
struct Question {
    name: String,
    qtype: u16,
    qclass: u16,
    end: usize,
}

/// The single question of a standard query; `None` for anything else.
fn parse_question(message: &[u8]) -> Option<Question> {
    if message.len() < 12 {
        return None;
    }
    let flags = u16::from_be_bytes([message[2], message[3]]);
    let is_query = flags & 0x8000 == 0;
    let opcode = (flags >> 11) & 0xf;
    let questions = u16::from_be_bytes([message[4], message[5]]);
    if !is_query || opcode != 0 || questions != 1 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*message.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        // Compression pointers (0xc0) never appear in a query's first name.
        if len > 63 {
            return None;
        }
        let label = message.get(at..at + len)?;
        labels.push(std::str::from_utf8(label).ok()?.to_owned());
        at += len;
    }
    let qtype = u16::from_be_bytes([*message.get(at)?, *message.get(at + 1)?]);
    let qclass = u16::from_be_bytes([*message.get(at + 2)?, *message.get(at + 3)?]);
    Some(Question {
        name: normalise(&labels.join(".")),
        qtype,
        qclass,
        end: at + 4,
    })
}

/// The answer to `query` from `table`, if the question is for one of its names: their A
/// records (none for other types, so a client asking for AAAA learns there is none and
/// does not wait for the forwarder).
fn answer_local(query: &[u8], table: &HashMap<String, Vec<Ipv4Addr>>) -> Option<Vec<u8>> {
    let question = parse_question(query)?;
    if question.qclass != CLASS_IN {
        return None;
    }
    let addresses = table.get(&question.name)?;
    let records: &[Ipv4Addr] = if matches!(question.qtype, TYPE_A | TYPE_ANY) {
        addresses
    } else {
        &[]
    };
    let mut answer = Vec::with_capacity(question.end + records.len() * 16);
    answer.extend_from_slice(&query[0..2]); // id
                                            // QR, opcode 0, AA, RD copied from the query, RA; rcode 0.
    let rd = query[2] & 0x01;
    answer.push(0x84 | rd);
    answer.push(0x80);
    answer.extend_from_slice(&1u16.to_be_bytes()); // one question
    answer.extend_from_slice(&(records.len() as u16).to_be_bytes());
    answer.extend_from_slice(&[0, 0, 0, 0]); // no authority, no additional
    answer.extend_from_slice(&query[12..question.end]);
    for address in records {
        answer.extend_from_slice(&[0xc0, 12]); // the question's name
        answer.extend_from_slice(&TYPE_A.to_be_bytes());
        answer.extend_from_slice(&CLASS_IN.to_be_bytes());
        answer.extend_from_slice(&ANSWER_TTL.to_be_bytes());
        answer.extend_from_slice(&4u16.to_be_bytes());
        answer.extend_from_slice(&address.octets());
    }
    Some(answer)
}

/// A SERVFAIL answer echoing the query's id and question; empty if the query has no header.
fn servfail(query: &[u8]) -> Vec<u8> {
    if query.len() < 12 {
        return Vec::new();
    }
    let end = parse_question(query).map_or(12, |q| q.end);
    let mut answer = query[..end].to_vec();
    answer[2] = 0x80 | (query[2] & 0x01);
    answer[3] = 0x80 | RCODE_SERVFAIL;
    let questions = if end > 12 { 1u16 } else { 0 };
    answer[4..6].copy_from_slice(&questions.to_be_bytes());
    answer[6..12].fill(0);
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut message = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            message.push(label.len() as u8);
            message.extend_from_slice(label.as_bytes());
        }
        message.push(0);
        message.extend_from_slice(&qtype.to_be_bytes());
        message.extend_from_slice(&CLASS_IN.to_be_bytes());
        message
    }

    fn table() -> HashMap<String, Vec<Ipv4Addr>> {
        HashMap::from([("web".to_owned(), vec![Ipv4Addr::new(172, 18, 0, 2)])])
    }

    #[test]
    fn parse_question_reads_name_type_and_end() {
        let message = query("Web.Example", TYPE_A);

        let question = parse_question(&message).unwrap();

        assert_eq!(question.name, "web.example");
        assert_eq!(question.qtype, TYPE_A);
        assert_eq!(question.end, message.len());
    }

    #[test]
    fn parse_question_truncated_name_is_none() {
        let mut message = query("web", TYPE_A);
        message.truncate(14);

        assert_eq!(parse_question(&message), None);
    }

    #[test]
    fn answer_local_known_name_has_its_a_record() {
        let message = query("web", TYPE_A);

        let answer = answer_local(&message, &table()).unwrap();

        assert_eq!(&answer[0..2], &[0x12, 0x34]);
        assert_eq!(answer[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([answer[6], answer[7]]), 1);
        assert_eq!(&answer[answer.len() - 4..], &[172, 18, 0, 2]);
    }

    #[test]
    fn answer_local_aaaa_for_a_known_name_is_empty_noerror() {
        let answer = answer_local(&query("web", 28), &table()).unwrap();

        assert_eq!(u16::from_be_bytes([answer[6], answer[7]]), 0);
    }

    #[test]
    fn answer_local_unknown_name_is_left_to_the_forwarder() {
        assert_eq!(answer_local(&query("example.com", TYPE_A), &table()), None);
    }

    #[test]
    fn servfail_keeps_id_and_question() {
        let message = query("example.com", TYPE_A);

        let answer = servfail(&message);

        assert_eq!(&answer[0..2], &[0x12, 0x34]);
        assert_eq!(answer[3] & 0x0f, RCODE_SERVFAIL);
        assert_eq!(&answer[12..], &message[12..]);
    }

    #[test]
    fn answer_tcp_answers_framed_queries_until_the_client_closes() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let address = listener.local_addr().unwrap();
        let gateway = Ipv4Addr::new(172, 18, 0, 1);
        let tables = Arc::new(Mutex::new(HashMap::from([(gateway, table())])));
        let server_tables = Arc::clone(&tables);
        let server = thread::spawn(move || {
            let (connection, _) = listener.accept().unwrap();
            answer_tcp(connection, gateway, &server_tables).unwrap();
        });
        let mut client = TcpStream::connect(address).unwrap();
        let message = query("web", TYPE_A);
        let mut framed = (message.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&message);

        client.write_all(&framed).unwrap();
        let mut length = [0u8; 2];
        client.read_exact(&mut length).unwrap();
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(length))];
        client.read_exact(&mut answer).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();

        assert_eq!(&answer[answer.len() - 4..], &[172, 18, 0, 2]);
        server.join().unwrap();
    }

    #[test]
    fn servfail_of_a_runt_is_nothing() {
        assert!(servfail(&[1, 2, 3]).is_empty());
    }
}
