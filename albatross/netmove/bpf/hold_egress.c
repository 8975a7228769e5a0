/* Zero-window hold: a TC egress classifier (direct action) for the source gateway.
 *
 * For every TCP segment leaving the host whose flow is in `held_flows`, the advertised
 * window is rewritten to 0 and the checksum fixed with bpf_l4_csum_replace. The client
 * then stops sending (it only probes the window) while the socket is drained, dumped and
 * moved; the restored socket on the target advertises its real window again.
 *
 * Why not TCP_REPAIR_WINDOW on the socket: the kernel re-opens the window by itself.
 * Every other packet passes untouched (TC_ACT_OK). The value counts rewritten segments.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "flow_key.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ALBATROSS_MAX_FLOWS);
	__type(key, struct flow_key);
	__type(value, __u64);
} held_flows SEC(".maps");

#define TCP_WINDOW_OFF 14
#define TCP_CSUM_OFF 16

SEC("tc")
int albatross_hold(struct __sk_buff *skb)
{
	struct flow_key key = {};
	__u32 l4 = 0;
	__u16 eth_proto = 0;

	if (bpf_skb_load_bytes(skb, 12, &eth_proto, sizeof(eth_proto)) < 0)
		return TC_ACT_OK;
	if (eth_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
			return TC_ACT_OK;
		if (ip.protocol != IPPROTO_TCP || ip.ihl < 5)
			return TC_ACT_OK;
		__builtin_memcpy(key.laddr, &ip.saddr, 4);
		__builtin_memcpy(key.raddr, &ip.daddr, 4);
		key.family = 4;
		l4 = ETH_HLEN + ip.ihl * 4;
	} else if (eth_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
			return TC_ACT_OK;
		/* Extension headers are not followed: a gateway's TCP segments carry none. */
		if (ip6.nexthdr != IPPROTO_TCP)
			return TC_ACT_OK;
		__builtin_memcpy(key.laddr, &ip6.saddr, 16);
		__builtin_memcpy(key.raddr, &ip6.daddr, 16);
		key.family = 6;
		l4 = ETH_HLEN + sizeof(struct ipv6hdr);
	} else {
		return TC_ACT_OK;
	}

	__be16 ports[2];
	if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)) < 0)
		return TC_ACT_OK;
	key.lport = ports[0];
	key.rport = ports[1];

	__u64 *hits = bpf_map_lookup_elem(&held_flows, &key);
	if (!hits)
		return TC_ACT_OK;

	__be16 window;
	if (bpf_skb_load_bytes(skb, l4 + TCP_WINDOW_OFF, &window, sizeof(window)) < 0)
		return TC_ACT_OK;
	if (window != 0) {
		__be16 zero = 0;

		/* Checksum first, from the old value to the new one; with CHECKSUM_PARTIAL
		 * the helper leaves the pseudo-header sum alone, which is what is wanted. */
		if (bpf_l4_csum_replace(skb, l4 + TCP_CSUM_OFF, window, zero, sizeof(zero)) < 0)
			return TC_ACT_OK;
		if (bpf_skb_store_bytes(skb, l4 + TCP_WINDOW_OFF, &zero, sizeof(zero), 0) < 0)
			return TC_ACT_OK;
	}
	__sync_fetch_and_add(hits, 1);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
