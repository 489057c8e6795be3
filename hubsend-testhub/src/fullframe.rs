//! Full-length performatives (PROTOCOL J).
//!
//! serde_amqp leaves trailing null/default fields out of a performative's list, which AMQP
//! allows, but Microsoft's Python SDK (pyamqp) builds each performative from a fixed number of
//! positional fields and fails (`OpenFrame.__new__() missing … arguments`, `IndexError`) on a
//! short list. The service writes every field, so the hub pads each outgoing performative's
//! list with nulls up to the performative's full field count. A TRANSFER's payload follows its
//! list and is carried over unchanged.

/// Full field count of an AMQP (frame type 0) or SASL (frame type 1) performative.
fn field_count(frame_type: u8, code: u64) -> Option<u32> {
    match (frame_type, code) {
        (0, 0x10) => Some(10), // open
        (0, 0x11) => Some(8),  // begin
        (0, 0x12) => Some(14), // attach
        (0, 0x13) => Some(11), // flow
        (0, 0x14) => Some(11), // transfer
        (0, 0x15) => Some(6),  // disposition
        (0, 0x16) => Some(3),  // detach
        (0, 0x17) => Some(1),  // end
        (0, 0x18) => Some(1),  // close
        (1, 0x40) => Some(1),  // sasl-mechanisms
        (1, 0x41) => Some(3),  // sasl-init
        (1, 0x42) => Some(1),  // sasl-challenge
        (1, 0x43) => Some(1),  // sasl-response
        (1, 0x44) => Some(2),  // sasl-outcome
        _ => None,
    }
}

fn be32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

/// Returns `frame` (one whole frame, header included) with its performative padded to full
/// length, or `None` when it already is full length or is not a performative frame.
pub(crate) fn pad(frame: &[u8]) -> Option<Vec<u8>> {
    let frame_type = *frame.get(5)?;
    let (doff, code, mut pos) = crate::wire::performative(frame)?;
    let body = &frame[doff..];
    let full = field_count(frame_type, code)?;
    let descriptor_end = pos;
    // The list: (count, start of the field bytes, end of the list).
    let (count, fields_start, list_end) = match *body.get(pos)? {
        0x45 => (0u32, pos + 1, pos + 1),
        0xc0 => {
            let size = *body.get(pos + 1)? as usize;
            let count = *body.get(pos + 2)? as u32;
            pos += 2;
            (count, pos + 1, pos + size)
        }
        0xd0 => {
            let size = be32(body.get(pos + 1..)?)? as usize;
            let count = be32(body.get(pos + 5..)?)?;
            pos += 5;
            (count, pos + 4, pos + size)
        }
        _ => return None,
    };
    if count >= full || list_end > body.len() {
        return None;
    }
    let fields = &body[fields_start..list_end];
    let missing = (full - count) as usize;
    let content_len = fields.len() + missing;
    let mut new_body = Vec::with_capacity(body.len() + missing + 8);
    new_body.extend_from_slice(&body[..descriptor_end]);
    if content_len < 255 {
        new_body.push(0xc0);
        new_body.push((content_len + 1) as u8);
        new_body.push(full as u8);
    } else {
        new_body.push(0xd0);
        new_body.extend_from_slice(&((content_len + 4) as u32).to_be_bytes());
        new_body.extend_from_slice(&full.to_be_bytes());
    }
    new_body.extend_from_slice(fields);
    new_body.extend(std::iter::repeat_n(0x40u8, missing));
    new_body.extend_from_slice(&body[list_end..]);
    Some(crate::wire::reframe(frame, doff, &new_body))
}

#[cfg(test)]
mod tests {
    use super::pad;
    use fe2o3_amqp_types::performatives::{Close, Flow, Transfer};

    fn frame(body: &[u8], frame_type: u8) -> Vec<u8> {
        let mut f = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&[2, frame_type, 0, 0]);
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn pads_short_lists_and_keeps_payload() {
        let transfer = Transfer {
            handle: 1.into(),
            delivery_id: Some(3),
            delivery_tag: None,
            message_format: Some(0),
            settled: None,
            more: false,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        };
        let mut body = serde_amqp::to_vec(&transfer).unwrap();
        body.extend_from_slice(b"PAYLOAD");
        let padded = pad(&frame(&body, 0)).unwrap();
        assert_eq!(
            u32::from_be_bytes(padded[..4].try_into().unwrap()) as usize,
            padded.len()
        );
        assert!(padded.ends_with(b"PAYLOAD"));
        let decoded: Transfer = serde_amqp::from_slice(&padded[8..padded.len() - 7]).unwrap();
        assert_eq!(decoded.delivery_id, Some(3));
        // list8: 0x00 0x53 0x14 0xc0 size count
        assert_eq!(padded[8 + 5], 11);

        // An empty list (list0) becomes a list8 of nulls.
        let close = serde_amqp::to_vec(&Close { error: None }).unwrap();
        let padded = pad(&frame(&close, 0)).unwrap();
        assert_eq!(&padded[8..], &[0x00, 0x53, 0x18, 0xc0, 2, 1, 0x40]);
        let _: Close = serde_amqp::from_slice(&padded[8..]).unwrap();

        // Already full, or not a performative: untouched.
        assert!(pad(&frame(&[0x00, 0x53, 0x18, 0xc0, 2, 1, 0x40], 0)).is_none());
        assert!(pad(&[0, 0, 0, 8, 2, 0, 0, 0]).is_none());
        let flow = Flow {
            next_incoming_id: Some(1),
            incoming_window: 10,
            next_outgoing_id: 1,
            outgoing_window: 10,
            handle: None,
            delivery_count: None,
            link_credit: None,
            available: None,
            drain: false,
            echo: false,
            properties: None,
        };
        let padded = pad(&frame(&serde_amqp::to_vec(&flow).unwrap(), 0)).unwrap();
        let decoded: Flow = serde_amqp::from_slice(&padded[8..]).unwrap();
        assert_eq!(decoded.incoming_window, 10);
    }
}
