//! Error types of the Rust core.
//!
//! Every error carries enough context to be shown to a user as is: decode errors name the file
//! (or `<bytes>` / `items[i]` for in-memory input) and the reason. The Python wrappers map
//! [`Error::Decode`] to `leukedge._native.DecodeError`, [`Error::Stain`] to `StainError`,
//! [`Error::Config`] to `ConfigError` and [`Error::Input`] to a plain `ValueError`.

use std::fmt;

/// Why an image could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeReason {
    /// The file exists but holds no bytes.
    ZeroByte,
    /// The data stops before the image is complete, or is otherwise corrupt.
    Truncated(String),
    /// The bytes are not a recognised image format at all.
    NotAnImage,
    /// The header declares more pixels than allowed (checked before any pixel buffer is allocated).
    TooLarge { width: u64, height: u64, max_pixels: u64 },
    /// The decoder itself refused the header as too large (e.g. BMP dimensions above 65535).
    LimitExceeded(String),
    /// A recognised format, or a feature of one, that this build does not decode.
    Unsupported(String),
    /// The file could not be read.
    Io(String),
}

impl fmt::Display for DecodeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeReason::ZeroByte => write!(f, "zero-byte file (empty, not an image)"),
            DecodeReason::Truncated(why) => write!(f, "truncated or corrupt image data ({why})"),
            DecodeReason::NotAnImage => write!(
                f,
                "not an image (unrecognised content; supported formats: BMP, PNG, JPEG, TIFF, WebP)"
            ),
            DecodeReason::TooLarge {
                width,
                height,
                max_pixels,
            } => write!(
                f,
                "image too large: {width}x{height} = {} pixels exceeds max_pixels={max_pixels} \
                 (possible decompression bomb; raise max_pixels if the image is genuine)",
                width * height
            ),
            DecodeReason::LimitExceeded(why) => write!(
                f,
                "image too large: {why} (possible decompression bomb; refused before allocating)"
            ),
            DecodeReason::Unsupported(what) => write!(f, "unsupported image: {what}"),
            DecodeReason::Io(why) => write!(f, "cannot read file: {why}"),
        }
    }
}

/// All errors raised by the core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An image could not be decoded; `source` names the file.
    #[error("{source_name}: {reason}")]
    Decode { source_name: String, reason: DecodeReason },
    /// Stain fitting failed (e.g. no usable foreground in any reference image).
    #[error("{0}")]
    Stain(String),
    /// The preprocessing configuration JSON is invalid.
    #[error("invalid preprocessing config: {0}")]
    Config(String),
    /// An input array or argument has the wrong shape, type or value.
    #[error("{0}")]
    Input(String),
}

impl Error {
    pub fn decode(source_name: impl Into<String>, reason: DecodeReason) -> Self {
        Error::Decode {
            source_name: source_name.into(),
            reason,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_error_names_file_and_reason() {
        let e = Error::decode("a/b.bmp", DecodeReason::ZeroByte);
        let s = e.to_string();
        assert!(s.starts_with("a/b.bmp: "), "{s}");
        assert!(s.contains("zero-byte"), "{s}");
    }

    #[test]
    fn too_large_mentions_limit() {
        let r = DecodeReason::TooLarge {
            width: 100_000,
            height: 100_000,
            max_pixels: 64_000_000,
        };
        let s = r.to_string();
        assert!(s.contains("100000x100000"), "{s}");
        assert!(s.contains("max_pixels=64000000"), "{s}");
    }
}
