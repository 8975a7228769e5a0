/* The key shared by the zero-window hold (TC egress, source host) and the guard (XDP,
 * target host), and by albatross/netmove/flows.py, which packs it: change all three
 * together. A flow is written from the gateway's side: its own (local) address and
 * port, and the client's (remote) ones. IPv4 addresses use the first 4 bytes of the
 * 16-byte fields, the rest is zero. Ports and addresses are in network byte order.
 */
#ifndef ALBATROSS_FLOW_KEY_H
#define ALBATROSS_FLOW_KEY_H

#include <linux/types.h>

struct flow_key {
	__u8 laddr[16];
	__u8 raddr[16];
	__be16 lport;
	__be16 rport;
	__u8 family; /* 4 or 6 */
	__u8 pad[3];
};

#define ALBATROSS_MAX_FLOWS 65536

#endif
