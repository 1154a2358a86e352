//! Negotiated compression: a message over a threshold travels as a binary frame holding the
//! zstd-compressed JSON of the same typed message, so the receiver always knows its type.
//! Decompression is bounded: a frame that would inflate past the limit is refused (zip bomb),
//! before inflating anything when it states its size, else once the limit is passed.

use std::cell::RefCell;
use std::io::Read;

use zstd::zstd_safe::{DCtx, ResetDirective};

/// The one compression this protocol knows, as named in `registration` and `registration_ack`.
pub const ZSTD: &str = "zstd";
/// Default size from which a message is compressed, in bytes of JSON.
pub const DEFAULT_THRESHOLD: usize = 1024;
/// zstd level: the first of the fast levels. The frames are small (a batch of a few messages
/// is 1-8 KiB), and at this size level -1 compressed 1.8 KB of varied JSON 2.2-2.4 times as fast
/// as levels 1-3 and inflated it 5.8-6 times as fast, for 5.2 times smaller instead of 6.3-6.4
/// (`zstd -b`; docs/PERFORMANCE.md, seventh round).
const LEVEL: i32 = -1;
/// zstd level of a frame of at least [`LARGE`] bytes (a checkpoint's piece, an assignment
/// carrying one): level -1 codes no literals, so base64 (6 bits a byte) went through whole,
/// where level 1 takes a quarter off it, at about 500 MB/s (a 256 KiB piece in half a
/// millisecond) on this machine (docs/PERFORMANCE.md, thirty-sixth round).
const LEVEL_LARGE: i32 = 1;
/// The size from which a frame is compressed at `LEVEL_LARGE`.
pub const LARGE: usize = 64 * 1024;

/// Why a binary frame could not be inflated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    #[error("compressed frame inflates past {limit} bytes")]
    TooBig { limit: usize },
    #[error("compressed frame is not valid zstd: {0}")]
    Corrupt(String),
    #[error("compressed frame does not hold UTF-8 text")]
    NotUtf8,
}

thread_local! {
    // Making a zstd context (its tables allocated and zeroed) cost more than compressing a
    // small frame: 11 % of the samples of both sides in a batched flood. Each thread keeps one
    // of each and reuses it.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static COMPRESSOR_LARGE: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<DCtx<'static>> = RefCell::new(DCtx::create());
}

/// Compresses frame text (at `LEVEL_LARGE` from [`LARGE`] bytes).
pub fn deflate(text: &str) -> Vec<u8> {
    let (compressor, level) = match text.len() >= LARGE {
        true => (&COMPRESSOR_LARGE, LEVEL_LARGE),
        false => (&COMPRESSOR, LEVEL),
    };
    let packed = compressor.with_borrow_mut(|c| {
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(level).ok();
        }
        c.as_mut()?.compress(text.as_bytes()).ok()
    });
    // INVARIANT: compressing from memory into memory cannot fail but for out-of-memory.
    packed.unwrap_or_else(|| text.as_bytes().to_vec())
}

/// Inflates a binary frame into frame text, refusing to produce more than `limit` bytes.
pub fn inflate(bytes: &[u8], limit: usize) -> Result<String, InflateError> {
    DECOMPRESSOR.with_borrow_mut(|ctx| {
        // A frame refused halfway leaves the context mid-stream.
        ctx.reset(ResetDirective::SessionOnly)
            .map_err(|code| InflateError::Corrupt(zstd::zstd_safe::get_error_name(code).into()))?;
        inflate_with(ctx, bytes, limit)
    })
}

fn inflate_with(
    ctx: &mut DCtx<'static>,
    bytes: &[u8],
    limit: usize,
) -> Result<String, InflateError> {
    // A frame of ours says how long its content is: inflated in one call into a buffer of
    // that size when within the limit (streaming through the decoder's buffers into a growing
    // string was a third of the coordinator's inflating), refused at once past it (what
    // follows the first frame only adds). Anything else streams, bounded.
    let stated = zstd::zstd_safe::get_frame_content_size(bytes);
    if let Ok(Some(size)) = stated
        && size > limit as u64
    {
        return Err(InflateError::TooBig { limit });
    }
    if let Ok(Some(size)) = stated {
        let mut out = Vec::with_capacity(size as usize);
        if ctx.decompress(&mut out, bytes).is_ok() {
            return String::from_utf8(out).map_err(|_| InflateError::NotUtf8);
        }
        ctx.reset(ResetDirective::SessionOnly)
            .map_err(|code| InflateError::Corrupt(zstd::zstd_safe::get_error_name(code).into()))?;
    }
    let decoder = zstd::stream::read::Decoder::with_context(bytes, ctx);
    let mut out = Vec::new();
    // One byte past the limit tells "exactly at the limit" from "over it".
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| InflateError::Corrupt(e.to_string()))?;
    if out.len() > limit {
        return Err(InflateError::TooBig { limit });
    }
    String::from_utf8(out).map_err(|_| InflateError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_large_repetitive_text_shrinks() {
        let text = format!(r#"{{"type":"task_state","state":"{}"}}"#, "ab".repeat(4000));
        let packed = deflate(&text);
        assert!(
            packed.len() * 10 < text.len(),
            "{} -> {}",
            text.len(),
            packed.len()
        );
        assert_eq!(inflate(&packed, 1 << 20), Ok(text.clone()));
        assert_eq!(inflate(&packed, text.len()), Ok(text));
    }

    /// A checkpoint's piece is base64 of whatever the task wrote, random bytes at worst: a large
    /// frame is compressed with its literals coded, a quarter smaller (level -1 sent it whole).
    #[test]
    fn a_large_frame_of_base64_shrinks_by_a_quarter() {
        use base64::Engine as _;
        // Bytes no coder can shrink: a 64-bit xorshift's output.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..3 * LARGE / 4 + 3)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&noise);
        let text = format!(r#"{{"type":"checkpoint_data","data":"{b64}"}}"#);
        assert!(text.len() >= LARGE);
        let packed = deflate(&text);
        assert!(
            packed.len() * 100 < text.len() * 80,
            "{} -> {}",
            text.len(),
            packed.len()
        );
        assert_eq!(inflate(&packed, 1 << 20), Ok(text));
    }

    #[test]
    fn a_bomb_is_refused_at_the_limit_and_junk_is_refused_clearly() {
        let bomb = deflate(&"0".repeat(64 << 20));
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        assert_eq!(
            inflate(&bomb, 1 << 20),
            Err(InflateError::TooBig { limit: 1 << 20 })
        );
        assert!(matches!(
            inflate(b"not zstd", 1024),
            Err(InflateError::Corrupt(_))
        ));
        assert!(matches!(
            inflate(&[], 1024),
            Err(InflateError::Corrupt(_)) | Ok(_)
        ));
        let latin1 = zstd::bulk::compress(&[0xff, 0xfe], 1).expect("compress");
        assert_eq!(inflate(&latin1, 1024), Err(InflateError::NotUtf8));
    }

    /// A bomb that states its size is refused from its header: nothing of it is inflated. Cut
    /// to its first bytes, it would be an incomplete frame (corrupt) if it were.
    #[test]
    fn a_frame_stating_a_size_past_the_limit_is_refused_before_inflating() {
        let bomb = deflate(&"0".repeat(16 << 20));
        assert!(matches!(
            zstd::zstd_safe::get_frame_content_size(&bomb),
            Ok(Some(n)) if n == 16 << 20
        ));
        let header = &bomb[..bomb.len().min(24)];
        assert_eq!(
            inflate(header, 1 << 20),
            Err(InflateError::TooBig { limit: 1 << 20 })
        );
        assert!(matches!(
            inflate(header, 32 << 20),
            Err(InflateError::Corrupt(_))
        ));
    }

    #[test]
    fn frames_without_their_size_or_several_in_a_row_inflate_whole_and_bounded() {
        let a = format!(r#"{{"type":"task_state","state":"{}"}}"#, "ab".repeat(900));
        let b = format!(r#"{{"type":"telemetry","x":"{}"}}"#, "cd".repeat(700));
        // Two frames in a row: the first one's size is not the whole.
        let two = [deflate(&a), deflate(&b)].concat();
        assert_eq!(inflate(&two, 1 << 20), Ok(format!("{a}{b}")));
        assert_eq!(
            inflate(&two, a.len() + 10),
            Err(InflateError::TooBig {
                limit: a.len() + 10
            })
        );
        // A frame that does not say its size.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).expect("encoder");
        enc.include_contentsize(false).expect("no size");
        std::io::Write::write_all(&mut enc, a.as_bytes()).expect("write");
        let streamed = enc.finish().expect("finish");
        assert!(matches!(
            zstd::zstd_safe::get_frame_content_size(&streamed),
            Ok(None)
        ));
        assert_eq!(inflate(&streamed, 1 << 20), Ok(a.clone()));
        assert_eq!(
            inflate(&streamed, 100),
            Err(InflateError::TooBig { limit: 100 })
        );
        // Exactly at the limit is within it.
        assert_eq!(inflate(&deflate(&a), a.len()), Ok(a.clone()));
        assert_eq!(
            inflate(&deflate(&a), a.len() - 1),
            Err(InflateError::TooBig { limit: a.len() - 1 })
        );
    }

    #[test]
    fn the_reused_contexts_start_afresh_after_a_refused_or_broken_frame() {
        let text = format!(r#"{{"type":"task_state","state":"{}"}}"#, "xy".repeat(2000));
        let packed = deflate(&text);
        assert_eq!(
            inflate(&deflate(&"0".repeat(1 << 20)), 1024),
            Err(InflateError::TooBig { limit: 1024 })
        );
        assert_eq!(inflate(&packed, 1 << 20), Ok(text.clone()));
        assert!(inflate(&packed[..packed.len() / 2], 1 << 20).is_err());
        assert_eq!(inflate(&packed, 1 << 20), Ok(text.clone()));
        assert_eq!(deflate(&text), packed, "the same input packs the same way");
    }
}
