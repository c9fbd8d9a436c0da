// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * libFuzzer target for the C side of the data path: the parser
 * (xg_classify) and the TCP stage (xg_tcp_judge), built with
 * AddressSanitizer and UBSan (make fuzz, and a short run in make test:
 * tests/unit/test_fuzz.py). The challenges are XDP's: their rewrite is
 * fuzzed through the program itself (tests/bpf/test_challenge.py).
 *
 * Input: one control byte, then the frame. The control byte picks the
 * direction, what XDP said of the frame (its XG_META_* flags) and the
 * modes. The frame is copied to a heap buffer of exactly its size, so a
 * read or write past its end is a sanitizer report, not a quiet overrun
 * into the next UMEM frame.
 *
 * Beyond memory safety it checks what must hold for any input:
 *   - a verdict is forward or drop;
 *   - every drop counts exactly one reason;
 *   - the frame is never changed.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "xg_parse.h"
#include "xg_shim.h"

static struct xg_tcp *tcp;
static uint64_t clock_ms = 100000ULL * 1000;

static uint64_t reasons_total(const struct xg_worker_stats *st)
{
	uint64_t n = 0;
	int i;

	for (i = 0; i < 64; i++)
		n += st->reasons[i].packets;
	return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const uint32_t modes[4] = { XG_MODE_OFF, XG_MODE_MONITOR, XG_MODE_ON, XG_MODE_AUTO };
	struct xg_tcp_cfg cfg = {
		.syn_rate = 10, .syn_burst = 5, .state_rate = 10, .state_burst = 5,
		.verify_ttl = 600,
	};
	struct xg_worker_stats st;
	struct xg_summary m;
	uint32_t len, before;
	uint8_t ctl, *frame;
	int verdict;

	if (size < 1 || size > 4096)
		return 0;
	if (!tcp && xg_tcp_create(4096, &cfg, &tcp))
		abort();
	ctl = data[0];
	len = (uint32_t)(size - 1);
	frame = malloc(len ? len : 1);
	if (!frame)
		abort();
	memcpy(frame, data + 1, len);

	xg_classify(frame, len, &m);
	if (m.reason != XG_REASON_REDIRECTED && m.reason != XG_REASON_MALFORMED &&
	    m.reason != XG_REASON_EXT_HEADER_LIMIT && m.reason != XG_REASON_L2_OTHER)
		abort();

	cfg.syn_mode = modes[(ctl >> 2) & 3];
	cfg.state_mode = modes[(ctl >> 4) & 3];
	cfg.learn_until = (ctl & 0x40) ? 100000 + 5 : 0;
	xg_tcp_configure(tcp, &cfg);
	clock_ms += 7;
	memset(&st, 0, sizeof(st));
	before = len;
	verdict = xg_tcp_judge(tcp, frame, &len, ctl & 1,
			       ((ctl >> 1) & 1 ? XG_META_STATE_OVER : 0) |
				       (ctl & 0x80 ? XG_META_FORWARD : 0),
			       (uint32_t)(clock_ms / 1000), &st);
	if (len != before || memcmp(frame, data + 1, len))
		abort();
	switch (verdict) {
	case XG_V_FORWARD:
		break;
	case XG_V_DROP:
		if (reasons_total(&st) != 1)
			abort();
		break;
	default:
		abort();
	}
	free(frame);
	return 0;
}
