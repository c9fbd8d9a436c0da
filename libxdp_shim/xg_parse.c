// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * The parser of bpf/xg_parse.h as C callers see it: the same code the XDP
 * program runs, for the parity tests, the fuzzers and tools.
 */
#include <string.h>

#include "xg_parse.h"
#include "xg_shim.h"

void xg_classify(const uint8_t *frame, uint32_t len, struct xg_summary *out)
{
	void *data = (void *)frame;
	struct xg_hdrs h;
	enum xg_reason r;

	memset(out, 0, sizeof(*out));
	r = xg_parse(data, data + len, &h);
	if (r == XG_REASON_REDIRECTED && h.l3)
		r = xg_judge_l4(&h);
	else if (r == XG_REASON_REDIRECTED && h.l3_proto != ETH_P_ARP)
		r = XG_REASON_L2_OTHER; /* no ethertype is allowed in an empty policy */
	xg_summarise(&h, data, r, out);
}
