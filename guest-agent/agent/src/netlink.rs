//! A small synchronous rtnetlink client: just the link, address and route requests container
//! networking needs (create a bridge or a veth pair, enslave, bring up, address, route).
//!
//! The agent is a static, threaded, synchronous PID 1, and the async rtnetlink crates bring a
//! runtime with them; the handful of messages below are encoded here instead, each one a
//! fixed header plus attributes, and unit-tested byte for byte. Every request asks for an ACK,
//! so a failure comes back as the kernel's errno.
//!
//! A netlink socket talks to the network namespace of the thread that opened it, so
//! configuring a container's side means opening a [`Netlink`] on a thread that joined the
//! container's namespace (see `network.rs`).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

// Message types and flags (linux/netlink.h, linux/rtnetlink.h).
const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
// Link attributes (linux/if_link.h).
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
// Address and route attributes (linux/if_addr.h, linux/rtnetlink.h).
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
const IFF_UP: u32 = 0x1;
const NLMSG_HDRLEN: usize = 16;

/// An rtnetlink request being encoded: the header, a fixed message, attributes.
#[derive(Debug)]
pub struct Message {
    bytes: Vec<u8>,
    nested: Vec<usize>,
}

impl Message {
    fn new(kind: u16, flags: u16) -> Self {
        Self::raw(kind, flags | NLM_F_ACK)
    }

    /// A message that asks for no ACK (a batch's begin and end markers).
    fn raw(kind: u16, flags: u16) -> Self {
        let mut bytes = Vec::with_capacity(128);
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // sequence, set by `finish`
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        Self {
            bytes,
            nested: Vec::new(),
        }
    }

    /// `struct ifinfomsg`: family, type, index, flags, change mask.
    fn ifinfo(mut self, index: u32, flags: u32, change: u32) -> Self {
        self.bytes.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
        self.bytes.extend_from_slice(&0u16.to_ne_bytes());
        self.bytes.extend_from_slice(&index.to_ne_bytes());
        self.bytes.extend_from_slice(&flags.to_ne_bytes());
        self.bytes.extend_from_slice(&change.to_ne_bytes());
        self
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Self {
        let len = 4 + data.len();
        self.bytes.extend_from_slice(&(len as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(data);
        self.pad();
        self
    }

    /// `struct nfgenmsg`: family, version 0, resource id (big-endian).
    fn nfgen(mut self, family: u8, resource: u16) -> Self {
        self.bytes.extend_from_slice(&[family, 0]);
        self.bytes.extend_from_slice(&resource.to_be_bytes());
        self
    }

    fn attr_be32(self, kind: u16, value: u32) -> Self {
        self.attr(kind, &value.to_be_bytes())
    }

    /// A nested attribute flagged `NLA_F_NESTED`, as nf_tables expects.
    fn begin_nested(self, kind: u16) -> Self {
        self.begin(kind | NLA_F_NESTED)
    }

    fn attr_str(self, kind: u16, text: &str) -> Self {
        let mut data = text.as_bytes().to_vec();
        data.push(0);
        self.attr(kind, &data)
    }

    fn begin(mut self, kind: u16) -> Self {
        self.nested.push(self.bytes.len());
        self.bytes.extend_from_slice(&0u16.to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self
    }

    fn end(mut self) -> Self {
        if let Some(start) = self.nested.pop() {
            let len = (self.bytes.len() - start) as u16;
            self.bytes[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn wants_ack(&self) -> bool {
        u16::from_ne_bytes([self.bytes[6], self.bytes[7]]) & NLM_F_ACK != 0
    }

    fn finish(mut self, sequence: u32) -> Vec<u8> {
        let len = self.bytes.len() as u32;
        self.bytes[0..4].copy_from_slice(&len.to_ne_bytes());
        self.bytes[8..12].copy_from_slice(&sequence.to_ne_bytes());
        self.bytes
    }
}

/// `ip link add <name> type bridge`.
pub fn new_bridge(name: &str) -> Message {
    Message::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
        .ifinfo(0, 0, 0)
        .attr_str(IFLA_IFNAME, name)
        .begin(IFLA_LINKINFO)
        .attr_str(IFLA_INFO_KIND, "bridge")
        .end()
}

/// `ip link add <name> type veth peer name <peer> address <mac> netns <fd>`.
pub fn new_veth(name: &str, peer: &str, peer_mac: &[u8; 6], peer_netns: RawFd) -> Message {
    let message = Message::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
        .ifinfo(0, 0, 0)
        .attr_str(IFLA_IFNAME, name)
        .begin(IFLA_LINKINFO)
        .attr_str(IFLA_INFO_KIND, "veth")
        .begin(IFLA_INFO_DATA)
        .begin(VETH_INFO_PEER)
        .ifinfo(0, 0, 0)
        .attr_str(IFLA_IFNAME, peer)
        .attr(IFLA_ADDRESS, peer_mac)
        .attr(IFLA_NET_NS_FD, &(peer_netns as u32).to_ne_bytes());
    message.end().end().end()
}

/// `ip link set <index> [master <master>] up`.
pub fn set_up(index: u32, master: Option<u32>) -> Message {
    let message = Message::new(RTM_NEWLINK, 0).ifinfo(index, IFF_UP, IFF_UP);
    match master {
        Some(master) => message.attr(IFLA_MASTER, &master.to_ne_bytes()),
        None => message,
    }
}

/// `ip link del <index>` (a veth takes its peer with it).
pub fn del_link(index: u32) -> Message {
    Message::new(RTM_DELLINK, 0).ifinfo(index, 0, 0)
}

/// `ip addr add <address>/<prefix_len> dev <index>`.
pub fn new_address(index: u32, address: Ipv4Addr, prefix_len: u8) -> Message {
    let mut message = Message::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL);
    // struct ifaddrmsg: family, prefix length, flags, scope, index.
    message
        .bytes
        .extend_from_slice(&[libc::AF_INET as u8, prefix_len, 0, RT_SCOPE_UNIVERSE]);
    message.bytes.extend_from_slice(&index.to_ne_bytes());
    message
        .attr(IFA_LOCAL, &address.octets())
        .attr(IFA_ADDRESS, &address.octets())
}

/// `ip route add default via <gateway>`.
pub fn new_default_route(gateway: Ipv4Addr) -> Message {
    let mut message = Message::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL);
    // struct rtmsg: family, dst len, src len, tos, table, protocol, scope, type, flags.
    message.bytes.extend_from_slice(&[
        libc::AF_INET as u8,
        0,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
    ]);
    message.bytes.extend_from_slice(&0u32.to_ne_bytes());
    message.attr(RTA_GATEWAY, &gateway.octets())
}

// nf_tables (linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h).
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFPROTO_IPV4: u8 = 2;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NF_INET_POST_ROUTING: u32 = 4;
/// `srcnat` priority of a NAT chain.
const NF_IP_PRI_NAT_SRC: u32 = 100;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_OIF: u32 = 5;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_REG_1: u32 = 1;

fn nft_type(message: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | message
}

/// The nf_tables batch `table ip <table> { chain postrouting { type nat hook postrouting
/// priority srcnat; oif <uplink> masquerade } }`: every packet routed out of the uplink
/// leaves with the uplink's address, so containers on the bridges reach what the guest
/// reaches.
pub fn masquerade_batch(table: &str, uplink_index: u32) -> Vec<Message> {
    let begin = Message::raw(NFNL_MSG_BATCH_BEGIN, 0).nfgen(0, NFNL_SUBSYS_NFTABLES);
    let new_table = Message::new(nft_type(NFT_MSG_NEWTABLE), NLM_F_CREATE)
        .nfgen(NFPROTO_IPV4, 0)
        .attr_str(NFTA_TABLE_NAME, table);
    let new_chain = Message::new(nft_type(NFT_MSG_NEWCHAIN), NLM_F_CREATE)
        .nfgen(NFPROTO_IPV4, 0)
        .attr_str(NFTA_CHAIN_TABLE, table)
        .attr_str(NFTA_CHAIN_NAME, "postrouting")
        .begin_nested(NFTA_CHAIN_HOOK)
        .attr_be32(NFTA_HOOK_HOOKNUM, NF_INET_POST_ROUTING)
        .attr_be32(NFTA_HOOK_PRIORITY, NF_IP_PRI_NAT_SRC)
        .end()
        .attr_str(NFTA_CHAIN_TYPE, "nat");
    let new_rule = Message::new(nft_type(NFT_MSG_NEWRULE), NLM_F_CREATE | NLM_F_APPEND)
        .nfgen(NFPROTO_IPV4, 0)
        .attr_str(NFTA_RULE_TABLE, table)
        .attr_str(NFTA_RULE_CHAIN, "postrouting")
        .begin_nested(NFTA_RULE_EXPRESSIONS)
        // meta load oif => reg 1
        .begin_nested(NFTA_LIST_ELEM)
        .attr_str(NFTA_EXPR_NAME, "meta")
        .begin_nested(NFTA_EXPR_DATA)
        .attr_be32(NFTA_META_DREG, NFT_REG_1)
        .attr_be32(NFTA_META_KEY, NFT_META_OIF)
        .end()
        .end()
        // cmp eq reg 1 <uplink index>
        .begin_nested(NFTA_LIST_ELEM)
        .attr_str(NFTA_EXPR_NAME, "cmp")
        .begin_nested(NFTA_EXPR_DATA)
        .attr_be32(NFTA_CMP_SREG, NFT_REG_1)
        .attr_be32(NFTA_CMP_OP, NFT_CMP_EQ)
        .begin_nested(NFTA_CMP_DATA)
        .attr(NFTA_DATA_VALUE, &uplink_index.to_ne_bytes())
        .end()
        .end()
        .end()
        // masq
        .begin_nested(NFTA_LIST_ELEM)
        .attr_str(NFTA_EXPR_NAME, "masq")
        .end()
        .end();
    let end = Message::raw(NFNL_MSG_BATCH_END, 0).nfgen(0, NFNL_SUBSYS_NFTABLES);
    vec![begin, new_table, new_chain, new_rule, end]
}

/// An rtnetlink socket in the calling thread's network namespace.
#[derive(Debug)]
pub struct Netlink {
    socket: OwnedFd,
    sequence: u32,
}

impl Netlink {
    /// Opens a `NETLINK_ROUTE` socket.
    pub fn open() -> io::Result<Self> {
        Self::open_protocol(libc::NETLINK_ROUTE)
    }

    /// Opens a `NETLINK_NETFILTER` socket (nf_tables).
    pub fn open_netfilter() -> io::Result<Self> {
        Self::open_protocol(libc::NETLINK_NETFILTER)
    }

    fn open_protocol(protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: plain socket creation; the descriptor is owned right below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `socket` just returned this descriptor and nothing else owns it.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Sends `message` and waits for the kernel's ACK; a refusal is its errno.
    pub fn request(&mut self, message: Message) -> io::Result<()> {
        self.batch(vec![message])
    }

    /// Sends `messages` in one write (an nf_tables batch) and waits for the ACK of the last
    /// one that asks for an ACK; the first refusal is returned.
    pub fn batch(&mut self, messages: Vec<Message>) -> io::Result<()> {
        let mut bytes = Vec::new();
        let mut awaited = 0;
        for message in messages {
            self.sequence = self.sequence.wrapping_add(1);
            if message.wants_ack() {
                awaited = self.sequence;
            }
            bytes.extend(message.finish(self.sequence));
        }
        // SAFETY: sends from a valid buffer of the given length; the kernel is the default
        // destination of an unbound netlink socket.
        let sent = unsafe {
            libc::send(
                self.socket.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut answer = [0u8; 4096];
        loop {
            // SAFETY: receives into a valid buffer of the given length.
            let got = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    answer.as_mut_ptr().cast(),
                    answer.len(),
                    0,
                )
            };
            if got < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            if let Some(result) = parse_ack(&answer[..got as usize], awaited) {
                return result;
            }
        }
    }
}

/// The result an answer carries for request `sequence`: `None` if the answer holds no ACK or
/// error for it (the caller reads on).
fn parse_ack(mut answer: &[u8], sequence: u32) -> Option<io::Result<()>> {
    while answer.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(answer[0..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(answer[4..6].try_into().ok()?);
        let seq = u32::from_ne_bytes(answer[8..12].try_into().ok()?);
        if len < NLMSG_HDRLEN || len > answer.len() {
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed netlink answer",
            )));
        }
        if kind == NLMSG_ERROR && len >= NLMSG_HDRLEN + 4 {
            let code = i32::from_ne_bytes(answer[16..20].try_into().ok()?);
            // An error for any message of the batch ends it; a success only for the last.
            if code != 0 {
                return Some(Err(io::Error::from_raw_os_error(-code)));
            }
            if seq == sequence {
                return Some(Ok(()));
            }
        }
        let aligned = (len + 3) & !3;
        answer = answer.get(aligned..).unwrap_or_default();
    }
    None
}

/// The index of interface `name` in the calling thread's network namespace.
pub fn index_of(name: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: reads the NUL-terminated string `name` owns.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([bytes[at], bytes[at + 1]])
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn new_bridge_encodes_header_name_and_kind() {
        let bytes = new_bridge("berth0").finish(7);

        assert_eq!(u32_at(&bytes, 0) as usize, bytes.len());
        assert_eq!(u16_at(&bytes, 4), RTM_NEWLINK);
        assert_eq!(
            u16_at(&bytes, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(u32_at(&bytes, 8), 7);
        // After the 16-byte header and the 16-byte ifinfomsg: IFLA_IFNAME "berth0\0" (4 + 7,
        // padded to 12), then IFLA_LINKINFO holding IFLA_INFO_KIND "bridge\0".
        assert_eq!(u16_at(&bytes, 32), 11);
        assert_eq!(u16_at(&bytes, 34), IFLA_IFNAME);
        assert_eq!(&bytes[36..43], b"berth0\0");
        assert_eq!(u16_at(&bytes, 44), 4 + 12);
        assert_eq!(u16_at(&bytes, 46), IFLA_LINKINFO);
        assert_eq!(u16_at(&bytes, 50), IFLA_INFO_KIND);
        assert_eq!(&bytes[52..59], b"bridge\0");
        assert_eq!(bytes.len(), 60);
    }

    #[test]
    fn new_veth_nests_the_peer_inside_info_data() {
        let bytes = new_veth("vb1", "eth0", &[2, 0x42, 172, 17, 0, 2], 9).finish(1);

        // Header 16 + ifinfomsg 16 + IFLA_IFNAME "vb1\0" 8 = 40: IFLA_LINKINFO spans the rest.
        assert_eq!(u16_at(&bytes, 40) as usize, bytes.len() - 40);
        assert_eq!(u16_at(&bytes, 42), IFLA_LINKINFO);
        let tail = &bytes[44..];
        // IFLA_INFO_KIND "veth\0" (4 + 5, padded to 12), then IFLA_INFO_DATA.
        assert_eq!(u16_at(tail, 2), IFLA_INFO_KIND);
        assert_eq!(u16_at(tail, 14), IFLA_INFO_DATA);
        assert_eq!(u16_at(tail, 16) as usize, tail.len() - 16);
        assert_eq!(u16_at(tail, 18), VETH_INFO_PEER);
        // The peer: an ifinfomsg (16) then its attributes; the last is the namespace fd.
        let fd_attr = tail.len() - 8;
        assert_eq!(u16_at(tail, fd_attr + 2), IFLA_NET_NS_FD);
        assert_eq!(u32_at(tail, fd_attr + 4), 9);
    }

    #[test]
    fn new_address_carries_local_and_prefix() {
        let bytes = new_address(3, Ipv4Addr::new(172, 17, 0, 2), 16).finish(1);

        assert_eq!(u16_at(&bytes, 4), RTM_NEWADDR);
        assert_eq!(bytes[16], libc::AF_INET as u8);
        assert_eq!(bytes[17], 16);
        assert_eq!(u32_at(&bytes, 20), 3);
        assert_eq!(u16_at(&bytes, 26), IFA_LOCAL);
        assert_eq!(&bytes[28..32], &[172, 17, 0, 2]);
    }

    #[test]
    fn new_default_route_carries_the_gateway() {
        let bytes = new_default_route(Ipv4Addr::new(172, 17, 0, 1)).finish(1);

        assert_eq!(u16_at(&bytes, 4), RTM_NEWROUTE);
        assert_eq!(bytes[16 + 4], RT_TABLE_MAIN);
        assert_eq!(u16_at(&bytes, 30), RTA_GATEWAY);
        assert_eq!(&bytes[32..36], &[172, 17, 0, 1]);
    }

    fn error_answer(sequence: u32, code: i32) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&36u32.to_ne_bytes());
        bytes.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        bytes.extend_from_slice(&0u16.to_ne_bytes());
        bytes.extend_from_slice(&sequence.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(&code.to_ne_bytes());
        bytes.extend_from_slice(&[0u8; 16]);
        bytes
    }

    #[test]
    fn parse_ack_zero_code_is_success() {
        assert!(matches!(parse_ack(&error_answer(5, 0), 5), Some(Ok(()))));
    }

    #[test]
    fn parse_ack_negative_code_is_that_errno() {
        let result = parse_ack(&error_answer(5, -libc::EEXIST), 5);

        let error = result.unwrap().unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EEXIST));
    }

    #[test]
    fn parse_ack_for_another_sequence_reads_on() {
        assert!(parse_ack(&error_answer(4, 0), 5).is_none());
    }

    #[test]
    fn masquerade_batch_is_framed_by_begin_and_end_and_acks_the_inner_messages() {
        let batch = masquerade_batch("berth", 2);

        let acked: Vec<bool> = batch.iter().map(Message::wants_ack).collect();
        assert_eq!(acked, [false, true, true, true, false]);
        let bytes = batch.into_iter().next().unwrap().finish(1);
        assert_eq!(u16_at(&bytes, 4), NFNL_MSG_BATCH_BEGIN);
        // nfgenmsg: resource id NFNL_SUBSYS_NFTABLES, big-endian.
        assert_eq!(&bytes[18..20], &NFNL_SUBSYS_NFTABLES.to_be_bytes());
    }

    #[test]
    fn masquerade_rule_compares_the_uplink_index_in_host_order() {
        let batch = masquerade_batch("berth", 0x0102_0304);

        let rule = batch.into_iter().nth(3).unwrap().finish(1);
        let value = 0x0102_0304u32.to_ne_bytes();
        assert!(rule.windows(4).any(|w| w == value));
        assert!(rule.windows(5).any(|w| w == b"masq\0"));
    }

    #[test]
    fn parse_ack_error_of_an_earlier_batch_message_ends_the_batch() {
        let result = parse_ack(&error_answer(3, -libc::ENOENT), 5);

        assert_eq!(
            result.unwrap().unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
    }

    #[test]
    fn parse_ack_length_past_the_buffer_is_malformed() {
        let mut answer = error_answer(5, 0);
        answer[0..4].copy_from_slice(&1000u32.to_ne_bytes());

        let result = parse_ack(&answer, 5);

        assert_eq!(
            result.unwrap().unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
