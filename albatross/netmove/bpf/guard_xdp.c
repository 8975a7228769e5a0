/* Guard: an XDP program for the target gateway that drops the packets of flows being
 * moved in, until their sockets are restored.
 *
 * The service address (VIP) reaches the target before the restored sockets exist; a
 * segment for a flow with no socket would be answered with a RST and kill the client's
 * connection. Dropping it is harmless: the client retransmits, and the zero-window hold
 * on the source already keeps it from sending data. The key is written from the
 * gateway's side, so an incoming packet's destination is the local half. The value
 * counts dropped packets.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "flow_key.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ALBATROSS_MAX_FLOWS);
	__type(key, struct flow_key);
	__type(value, __u64);
} guarded_flows SEC(".maps");

SEC("xdp")
int albatross_guard(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct flow_key key = {};
	struct tcphdr *tcp;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return XDP_PASS;
		if (ip->protocol != IPPROTO_TCP || ip->ihl < 5)
			return XDP_PASS;
		__builtin_memcpy(key.laddr, &ip->daddr, 4);
		__builtin_memcpy(key.raddr, &ip->saddr, 4);
		key.family = 4;
		tcp = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return XDP_PASS;
		if (ip6->nexthdr != IPPROTO_TCP)
			return XDP_PASS;
		__builtin_memcpy(key.laddr, &ip6->daddr, 16);
		__builtin_memcpy(key.raddr, &ip6->saddr, 16);
		key.family = 6;
		tcp = (void *)(ip6 + 1);
	} else {
		return XDP_PASS;
	}
	if ((void *)(tcp + 1) > data_end)
		return XDP_PASS;
	key.lport = tcp->dest;
	key.rport = tcp->source;

	__u64 *hits = bpf_map_lookup_elem(&guarded_flows, &key);
	if (!hits)
		return XDP_PASS;
	__sync_fetch_and_add(hits, 1);
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
