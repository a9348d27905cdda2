//! Which code path runs: the x86 SIMD kernels (AVX2, F16C, SSSE3, and fast_image_resize's own
//! AVX2/SSE4.1 resizers) or the portable ones that Arm boards such as a Jetson run.
//!
//! Every SIMD dispatch in the crate asks this module, never `is_x86_feature_detected!` directly,
//! so one switch forces every portable path on an x86 machine:
//!
//! * the environment variable [`PORTABLE_ENV`] (`LEUKEDGE_PORTABLE=1`), read once per process, the
//!   first time a kernel asks (set it before the first image is processed);
//! * [`with_portable`], for the calling thread only, so a test can run both paths in one process
//!   and compare them.
//!
//! Not covered: the image decoders' own internals (the `image` crate's JPEG decoder, zune-jpeg,
//! picks SIMD by itself; BMP, the C-NMC format, and PNG decoding have no SIMD paths).

use std::cell::Cell;
use std::sync::OnceLock;

/// Environment variable that forces the portable paths when set to anything but
/// ``""``, ``0``, ``false``, ``no`` or ``off`` (case-insensitive).
pub const PORTABLE_ENV: &str = "LEUKEDGE_PORTABLE";

/// Whether the value of [`PORTABLE_ENV`] turns the switch on.
pub fn flag_set(value: Option<&str>) -> bool {
    match value.map(str::trim) {
        None => false,
        Some(v) => !(v.is_empty() || ["0", "false", "no", "off"].iter().any(|f| v.eq_ignore_ascii_case(f))),
    }
}

fn env_portable() -> bool {
    static PORTABLE: OnceLock<bool> = OnceLock::new();
    *PORTABLE.get_or_init(|| flag_set(std::env::var(PORTABLE_ENV).ok().as_deref()))
}

thread_local! {
    static FORCED: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with the portable paths forced on the calling thread (work it hands to other
/// threads, e.g. a rayon batch, is not affected). Restores the previous state, also on panic.
pub fn with_portable<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(true)));
    f()
}

/// True when the portable paths are forced (environment variable, or [`with_portable`] on this thread).
pub fn portable() -> bool {
    env_portable() || FORCED.with(Cell::get)
}

/// AVX2 kernels may run.
#[inline]
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !portable() && std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX2 + F16C kernels (float16 output) may run.
#[inline]
pub fn avx2_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2() && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// SSSE3 kernels may run.
#[inline]
pub fn ssse3() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !portable() && std::arch::is_x86_feature_detected!("ssse3")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The CPU extensions fast_image_resize may use: none when portable, else its own best choice.
pub fn resize_extensions() -> fast_image_resize::CpuExtensions {
    if portable() {
        fast_image_resize::CpuExtensions::None
    } else {
        fast_image_resize::CpuExtensions::default()
    }
}

/// `(name, in use)` of every SIMD path of the crate, for `leukedge._native.cpu_paths()`.
pub fn paths() -> Vec<(&'static str, bool)> {
    vec![
        ("portable", portable()),
        ("avx2", avx2()),
        ("avx2_f16c", avx2_f16c()),
        ("ssse3", ssse3()),
        ("resize_simd", resize_extensions() != fast_image_resize::CpuExtensions::None),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values() {
        assert!(!flag_set(None));
        for v in ["", " ", "0", "false", "NO", "off"] {
            assert!(!flag_set(Some(v)), "{v:?}");
        }
        for v in ["1", "yes", "true", "on"] {
            assert!(flag_set(Some(v)), "{v:?}");
        }
    }

    #[test]
    fn with_portable_forces_and_restores() {
        let before = portable();
        with_portable(|| {
            assert!(portable());
            assert!(!avx2() && !avx2_f16c() && !ssse3());
            assert_eq!(resize_extensions(), fast_image_resize::CpuExtensions::None);
        });
        assert_eq!(portable(), before);
        let r = std::panic::catch_unwind(|| with_portable(|| panic!("inside")));
        assert!(r.is_err());
        assert_eq!(portable(), before);
    }
}
