//! Decoding and the reference transforms, on `u8` pixels until normalisation.
//!
//! Training views follow torchvision's `RandomResizedCrop` + `RandomHorizontalFlip` (crop, then
//! resize the crop); evaluation views its `Resize(size * 256 / 224)` + `CenterCrop(size)`.
//! Resampling is Pillow's convolution (a filter whose support widens with the shrink factor, so
//! shrinking averages instead of aliasing), computed by `fast_image_resize`. A JPEG whose
//! region of interest is at least twice the output on both axes is decoded at 1/2, 1/4 or 1/8
//! of its size (scaled IDCT), as libjpeg's `scale_denom` and Pillow's `draft` do.

use std::cell::RefCell;
use std::io::Cursor;

use fast_image_resize as fr;
use umae_api::recipe::{AugmentSpec, Interpolation};
use umae_api::Rng;

/// Decoded pixels: `height` rows of `width` pixels of `channels` interleaved `u8` values.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<u8>,
}

impl Image {
    /// Pixel `(x, y)`, channel `c`.
    pub fn at(&self, x: usize, y: usize, c: usize) -> u8 {
        self.data[(y * self.width + x) * self.channels + c]
    }
}

/// What a dataset hands the pipeline: pixels it holds, or the bytes of an encoded file.
#[derive(Debug, Clone)]
pub enum Sample {
    Pixels(Image),
    /// A PNG or JPEG file; `name` says where it came from in errors.
    Encoded {
        bytes: Vec<u8>,
        name: String,
    },
}

fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

fn zune_options(channels: usize) -> zune_core::options::DecoderOptions {
    use zune_core::colorspace::ColorSpace;
    zune_core::options::DecoderOptions::default()
        .jpeg_set_out_colorspace(if channels == 1 {
            ColorSpace::Luma
        } else {
            ColorSpace::RGB
        })
        .set_max_width(1 << 16)
        .set_max_height(1 << 16)
}

impl Sample {
    /// Width and height, read from the header of an encoded file.
    pub fn dims(&self) -> Result<(usize, usize), String> {
        match self {
            Sample::Pixels(img) => Ok((img.width, img.height)),
            Sample::Encoded { bytes, name } => {
                let bad = |e: &dyn std::fmt::Display| format!("cannot decode {name}: {e}");
                if is_jpeg(bytes) {
                    let mut d = zune_jpeg::JpegDecoder::new_with_options(
                        zune_core::bytestream::ZCursor::new(&bytes[..]),
                        zune_options(3),
                    );
                    d.decode_headers().map_err(|e| bad(&e))?;
                    let info = d.info().ok_or_else(|| bad(&"no frame header"))?;
                    Ok((info.width as usize, info.height as usize))
                } else {
                    let (w, h) = image::ImageReader::new(Cursor::new(&bytes[..]))
                        .with_guessed_format()
                        .map_err(|e| bad(&e))?
                        .into_dimensions()
                        .map_err(|e| bad(&e))?;
                    Ok((w as usize, h as usize))
                }
            }
        }
    }

    /// The pixels with `channels` channels (1: grey, 3: RGB; files are converted). A JPEG is
    /// decoded at `1 / reduce` of its size when `reduce` is 2, 4 or 8 (anything else: full size).
    pub fn decode(self, channels: usize, reduce: usize) -> Result<Image, String> {
        let (bytes, name) = match self {
            Sample::Pixels(img) => return Ok(img),
            Sample::Encoded { bytes, name } => (bytes, name),
        };
        let bad = |e: &dyn std::fmt::Display| format!("cannot decode {name}: {e}");
        if channels != 1 && channels != 3 {
            return Err(format!(
                "{name}: image files decode to 1 (grey) or 3 (RGB) channels, the recipe says data.channels = {channels}"
            ));
        }
        if is_jpeg(&bytes) {
            if matches!(reduce, 2 | 4 | 8) {
                if let Some(img) =
                    decode_jpeg_scaled(&bytes, channels, reduce).map_err(|e| bad(&e))?
                {
                    return Ok(img);
                }
            }
            let mut d = zune_jpeg::JpegDecoder::new_with_options(
                zune_core::bytestream::ZCursor::new(&bytes[..]),
                zune_options(channels),
            );
            let data = d.decode().map_err(|e| bad(&e))?;
            let info = d.info().ok_or_else(|| bad(&"no frame header"))?;
            let (width, height) = (info.width as usize, info.height as usize);
            let got = d.output_colorspace().map_or(0, |c| c.num_components());
            if got == channels && data.len() == width * height * channels {
                return Ok(Image {
                    channels,
                    height,
                    width,
                    data,
                });
            }
            // A colour space zune-jpeg does not convert to the one asked (CMYK, ...): the generic
            // decoder below handles it.
        }
        let img = image::load_from_memory(&bytes).map_err(|e| bad(&e))?;
        let (width, height) = (img.width() as usize, img.height() as usize);
        let data = if channels == 1 {
            img.into_luma8().into_raw()
        } else {
            img.into_rgb8().into_raw()
        };
        Ok(Image {
            channels,
            height,
            width,
            data,
        })
    }
}

/// A JPEG decoded at `1 / reduce` of its size, or `None` when its pixel format is not grey or
/// RGB (the caller decodes it at full size).
fn decode_jpeg_scaled(
    bytes: &[u8],
    channels: usize,
    reduce: usize,
) -> Result<Option<Image>, jpeg_decoder::Error> {
    use jpeg_decoder::PixelFormat;
    let mut d = jpeg_decoder::Decoder::new(bytes);
    d.read_info()?;
    let Some(info) = d.info() else {
        return Ok(None);
    };
    let (w, h) = (info.width as usize, info.height as usize);
    let (sw, sh) = d.scale(w.div_ceil(reduce) as u16, h.div_ceil(reduce) as u16)?;
    let px = d.decode()?;
    let (width, height) = (sw as usize, sh as usize);
    let data = match (info.pixel_format, channels) {
        (PixelFormat::L8, 1) | (PixelFormat::RGB24, 3) => px,
        (PixelFormat::L8, 3) => px.iter().flat_map(|&v| [v, v, v]).collect(),
        (PixelFormat::RGB24, 1) => px.chunks_exact(3).map(luma).collect(),
        _ => return Ok(None),
    };
    Ok(Some(Image {
        channels,
        height,
        width,
        data,
    }))
}

/// ITU-R 601 luma, as Pillow's `convert("L")`.
fn luma(rgb: &[u8]) -> u8 {
    ((rgb[0] as u32 * 19595 + rgb[1] as u32 * 38470 + rgb[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// A crop in source pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Crop {
    pub x0: f64,
    pub y0: f64,
    pub w: f64,
    pub h: f64,
}

/// torchvision's `RandomResizedCrop.get_params`: 10 tries at a random area and log-uniform
/// aspect ratio, falling back to a center crop. Integer crops.
pub fn random_crop(w: usize, h: usize, a: &AugmentSpec, rng: &mut Rng) -> Crop {
    let (w, h) = (w as f64, h as f64);
    let area = h * w;
    let (lr0, lr1) = (a.crop_ratio.0.ln(), a.crop_ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.range(a.crop_scale.0, a.crop_scale.1);
        let ratio = rng.range(lr0, lr1).exp();
        let cw = (target * ratio).sqrt().round();
        let ch = (target / ratio).sqrt().round();
        if cw >= 1.0 && ch >= 1.0 && cw <= w && ch <= h {
            let x0 = (rng.uniform() * (w - cw + 1.0)).floor();
            let y0 = (rng.uniform() * (h - ch + 1.0)).floor();
            return Crop {
                x0,
                y0,
                w: cw,
                h: ch,
            };
        }
    }
    let ratio = w / h;
    let (cw, ch) = if ratio < a.crop_ratio.0 {
        (w, (w / a.crop_ratio.0).round())
    } else if ratio > a.crop_ratio.1 {
        ((h * a.crop_ratio.1).round(), h)
    } else {
        (w, h)
    };
    Crop {
        x0: ((w - cw) / 2.0).floor(),
        y0: ((h - ch) / 2.0).floor(),
        w: cw,
        h: ch,
    }
}

/// The largest of 1, 2, 4, 8 that keeps a `region_w x region_h` region at least `out_w x out_h`.
fn reduction(region_w: f64, region_h: f64, out_w: usize, out_h: usize) -> usize {
    let k = (region_w / out_w as f64).min(region_h / out_h as f64);
    [8, 4, 2].into_iter().find(|&r| k >= r as f64).unwrap_or(1)
}

fn filter(i: Interpolation) -> fr::FilterType {
    match i {
        // Pillow's BICUBIC is the cubic convolution with a = -0.5, i.e. Catmull-Rom.
        Interpolation::Bicubic => fr::FilterType::CatmullRom,
        Interpolation::Bilinear => fr::FilterType::Bilinear,
    }
}

thread_local! {
    static RESIZER: RefCell<fr::Resizer> = RefCell::new(fr::Resizer::new());
}

fn pixel_type(channels: usize) -> Option<fr::PixelType> {
    match channels {
        1 => Some(fr::PixelType::U8),
        2 => Some(fr::PixelType::U8x2),
        3 => Some(fr::PixelType::U8x3),
        4 => Some(fr::PixelType::U8x4),
        _ => None,
    }
}

/// Resample `crop` of `img` to `out_w x out_h`. An integer crop is cut out first, so the filter
/// sees only its pixels (torchvision's crop-then-resize); a fractional one (after a scaled
/// decode) is a box over the whole image.
pub fn resize(
    img: &Image,
    crop: Crop,
    out_w: usize,
    out_h: usize,
    interp: Interpolation,
) -> Result<Vec<u8>, String> {
    let Some(pt) = pixel_type(img.channels) else {
        // More than 4 channels: one plane at a time.
        let c = img.channels;
        let planes: Vec<Vec<u8>> = (0..c)
            .map(|k| {
                let plane = Image {
                    channels: 1,
                    height: img.height,
                    width: img.width,
                    data: img.data.iter().skip(k).step_by(c).copied().collect(),
                };
                resize(&plane, crop, out_w, out_h, interp)
            })
            .collect::<Result<_, _>>()?;
        let mut out = vec![0; out_w * out_h * c];
        for (k, p) in planes.iter().enumerate() {
            for (i, v) in p.iter().enumerate() {
                out[i * c + k] = *v;
            }
        }
        return Ok(out);
    };
    let err =
        |e: &dyn std::fmt::Display| format!("resize of a {}x{} image: {e}", img.width, img.height);
    let src = fr::images::ImageRef::new(img.width as u32, img.height as u32, &img.data, pt)
        .map_err(|e| err(&e))?;
    let mut dst = fr::images::Image::new(out_w as u32, out_h as u32, pt);
    let options = fr::ResizeOptions::new()
        .resize_alg(fr::ResizeAlg::Convolution(filter(interp)))
        .use_alpha(false);
    let integer = [crop.x0, crop.y0, crop.w, crop.h]
        .iter()
        .all(|v| v.fract() == 0.0);
    RESIZER.with_borrow_mut(|r| {
        if !integer {
            return r
                .resize(
                    &src,
                    &mut dst,
                    &options.crop(crop.x0, crop.y0, crop.w, crop.h),
                )
                .map_err(|e| err(&e));
        }
        let view = fr::images::CroppedImage::new(
            &src,
            crop.x0 as u32,
            crop.y0 as u32,
            crop.w as u32,
            crop.h as u32,
        )
        .map_err(|e| err(&e))?;
        // Rows first, then columns, as Pillow: with bicubic overshoot clipped to 0..=255 between
        // the passes, the other order differs by a few levels at hard edges.
        let mut rows = fr::images::Image::new(out_w as u32, crop.h as u32, pt);
        r.resize(&view, &mut rows, &options).map_err(|e| err(&e))?;
        r.resize(&rows, &mut dst, &options).map_err(|e| err(&e))
    })?;
    Ok(dst.into_vec())
}

/// Mirror rows of `width` pixels of `channels` values in place.
pub fn flip_rows(px: &mut [u8], width: usize, channels: usize) {
    for row in px.chunks_exact_mut(width * channels) {
        match channels {
            1 => row.reverse(),
            3 => row.as_chunks_mut::<3>().0.reverse(),
            _ => {
                for x in 0..width / 2 {
                    let (a, b) = (x * channels, (width - 1 - x) * channels);
                    for c in 0..channels {
                        row.swap(a + c, b + c);
                    }
                }
            }
        }
    }
}

/// A training view: RandomResizedCrop to `size` then a horizontal flip with probability 1/2
/// (when `a.hflip`). `size * size * channels` values, interleaved.
pub fn train_view(
    sample: Sample,
    channels: usize,
    size: usize,
    a: &AugmentSpec,
    rng: &mut Rng,
) -> Result<Vec<u8>, String> {
    let flip = a.hflip && rng.uniform() < 0.5;
    let (w, h) = sample.dims()?;
    let crop = random_crop(w, h, a, rng);
    let img = sample.decode(channels, reduction(crop.w, crop.h, size, size))?;
    let crop = rescale(crop, &img, w, h);
    let mut px = resize(&img, crop, size, size, a.interpolation)?;
    if flip {
        flip_rows(&mut px, size, img.channels);
    }
    Ok(px)
}

/// `crop` (in the pixels of a `w x h` image) in the pixels of `img`, a reduced decode of it.
fn rescale(crop: Crop, img: &Image, w: usize, h: usize) -> Crop {
    if img.width == w && img.height == h {
        return crop;
    }
    let (sx, sy) = (img.width as f64 / w as f64, img.height as f64 / h as f64);
    Crop {
        x0: crop.x0 * sx,
        y0: crop.y0 * sy,
        w: (crop.w * sx).min(img.width as f64 - crop.x0 * sx),
        h: (crop.h * sy).min(img.height as f64 - crop.y0 * sy),
    }
}

/// The evaluation view: images already `size x size` pass unchanged; others have their shorter
/// side resized to `size * 256 / 224` (MAE's 224 -> 256) and the center `size x size` cut out,
/// as torchvision's `Resize` + `CenterCrop`.
pub fn eval_view(
    sample: Sample,
    channels: usize,
    size: usize,
    interp: Interpolation,
) -> Result<Vec<u8>, String> {
    let (w, h) = sample.dims()?;
    if w == size && h == size {
        return Ok(sample.decode(channels, 1)?.data);
    }
    let short = size * 256 / 224;
    let (rw, rh) = if w <= h {
        (short, (short as f64 * h as f64 / w as f64) as usize)
    } else {
        ((short as f64 * w as f64 / h as f64) as usize, short)
    };
    let img = sample.decode(channels, reduction(w as f64, h as f64, rw, rh))?;
    let full = Crop {
        x0: 0.0,
        y0: 0.0,
        w: img.width as f64,
        h: img.height as f64,
    };
    let resized = resize(&img, full, rw, rh, interp)?;
    let top = ((rh - size) as f64 / 2.0).round_ties_even() as usize;
    let left = ((rw - size) as f64 / 2.0).round_ties_even() as usize;
    let c = img.channels;
    let mut out = Vec::with_capacity(size * size * c);
    for y in top..top + size {
        out.extend_from_slice(&resized[(y * rw + left) * c..(y * rw + left + size) * c]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey(w: usize, h: usize, f: impl Fn(usize, usize) -> u8) -> Image {
        Image {
            channels: 1,
            height: h,
            width: w,
            data: (0..h)
                .flat_map(|y| (0..w).map(move |x| (x, y)))
                .map(|(x, y)| f(x, y))
                .collect(),
        }
    }

    fn whole(img: &Image) -> Crop {
        Crop {
            x0: 0.0,
            y0: 0.0,
            w: img.width as f64,
            h: img.height as f64,
        }
    }

    #[test]
    fn same_size_resize_is_identity_and_flip_mirrors() {
        let img = grey(4, 4, |x, y| (y * 4 + x) as u8);
        for i in [Interpolation::Bicubic, Interpolation::Bilinear] {
            assert_eq!(resize(&img, whole(&img), 4, 4, i).unwrap(), img.data);
        }
        let mut px = img.data.clone();
        flip_rows(&mut px, 4, 1);
        assert_eq!(&px[..4], &[3, 2, 1, 0]);
    }

    #[test]
    fn a_fine_checkerboard_shrunk_4x_is_flat_grey() {
        // One-pixel squares: every 4x4 block holds eight of each, so an antialiased shrink is
        // mid-grey everywhere. Point sampling (no antialiasing) would keep a black-and-white
        // pattern, since every sample lands on a square.
        let img = grey(64, 64, |x, y| if (x + y) % 2 == 0 { 255 } else { 0 });
        for i in [Interpolation::Bicubic, Interpolation::Bilinear] {
            let out = resize(&img, whole(&img), 16, 16, i).unwrap();
            let (lo, hi) = (out.iter().min().unwrap(), out.iter().max().unwrap());
            assert!(*lo >= 125 && *hi <= 130, "{i:?}: values from {lo} to {hi}");
        }
    }

    #[test]
    fn the_crop_is_cut_out_before_resizing() {
        // Left half black, right half white; a crop of the left half resized must stay black
        // to its edge (a box filter over the whole image would pull in white at the border).
        let img = grey(16, 8, |x, _| if x < 8 { 0 } else { 255 });
        let crop = Crop {
            x0: 0.0,
            y0: 0.0,
            w: 8.0,
            h: 8.0,
        };
        let out = resize(&img, crop, 4, 4, Interpolation::Bicubic).unwrap();
        assert!(out.iter().all(|&v| v == 0), "{out:?}");
    }

    fn png(name: &str) -> Image {
        let path = format!(
            "{}/../tests/fixtures/pillow/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let img = image::open(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .into_rgb8();
        Image {
            channels: 3,
            height: img.height() as usize,
            width: img.width() as usize,
            data: img.into_raw(),
        }
    }

    /// Largest and mean absolute difference.
    fn differences(a: &[u8], b: &[u8]) -> (u8, f64) {
        assert_eq!(a.len(), b.len());
        let worst = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        let mean = a
            .iter()
            .zip(b)
            .map(|(x, y)| x.abs_diff(*y) as f64)
            .sum::<f64>()
            / a.len() as f64;
        (worst, mean)
    }

    /// Against Pillow's own output (scripts/pillow-fixture.py wrote the expected images): at most
    /// 1 level apart on any value (rounding of the fixed-point weights).
    #[test]
    fn resizes_match_pillow() {
        let src = png("source.png");
        let text = std::fs::read_to_string(format!(
            "{}/../tests/fixtures/pillow/crop.txt",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let b: Vec<f64> = text
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        let crop = Crop {
            x0: b[0],
            y0: b[1],
            w: b[2] - b[0],
            h: b[3] - b[1],
        };
        for (interp, expected) in [
            (Interpolation::Bicubic, "crop-bicubic.png"),
            (Interpolation::Bilinear, "crop-bilinear.png"),
        ] {
            let out = resize(&src, crop, 24, 24, interp).unwrap();
            let (worst, mean) = differences(&out, &png(expected).data);
            assert!(
                worst <= 1 && mean < 0.2,
                "{expected}: up to {worst} apart, {mean:.3} on average"
            );
        }
        let out = eval_view(Sample::Pixels(src), 3, 24, Interpolation::Bicubic).unwrap();
        let (worst, mean) = differences(&out, &png("eval-bicubic.png").data);
        assert!(
            worst <= 1 && mean < 0.2,
            "eval view: up to {worst} apart, {mean:.3} on average"
        );
    }

    #[test]
    fn reductions_keep_the_region_at_least_the_output() {
        assert_eq!(reduction(500.0, 375.0, 224, 224), 1);
        assert_eq!(reduction(448.0, 460.0, 224, 224), 2);
        assert_eq!(reduction(1000.0, 2000.0, 224, 224), 4);
        assert_eq!(reduction(4000.0, 4000.0, 224, 224), 8);
    }

    #[test]
    fn scaled_jpeg_decodes_match_full_decodes_resized() {
        // A smooth picture: the 1/2- and 1/4-scale decodes resized to 32x32 stay close to the
        // full decode resized the same way.
        let rgb = image::RgbImage::from_fn(256, 192, |x, y| {
            image::Rgb([
                (x as f32 / 1.0) as u8,
                (y as f32 * 1.3) as u8,
                ((x + y) / 2) as u8,
            ])
        });
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95)
            .encode_image(&rgb)
            .unwrap();
        let sample = || Sample::Encoded {
            bytes: bytes.clone(),
            name: "t.jpg".into(),
        };
        assert_eq!(sample().dims().unwrap(), (256, 192));
        let full = sample().decode(3, 1).unwrap();
        assert_eq!((full.width, full.height), (256, 192));
        let reference = resize(&full, whole(&full), 32, 32, Interpolation::Bicubic).unwrap();
        for k in [2, 4] {
            let small = sample().decode(3, k).unwrap();
            assert_eq!((small.width, small.height), (256 / k, 192 / k));
            let out = resize(&small, whole(&small), 32, 32, Interpolation::Bicubic).unwrap();
            let worst = out
                .iter()
                .zip(&reference)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            assert!(worst <= 6, "1/{k} decode: differs by up to {worst}");
        }
    }

    #[test]
    fn eval_view_resizes_the_shorter_side_and_crops_the_center() {
        // 28x56 grey ramp along y: shorter side 28 -> 32, then 64 rows -> center 28.
        let img = grey(28, 56, |_, y| (y * 4) as u8);
        let out = eval_view(Sample::Pixels(img.clone()), 1, 28, Interpolation::Bilinear).unwrap();
        assert_eq!(out.len(), 28 * 28);
        // The center crop starts at row 18 of 64: source row ~15.75, value ~63.
        assert!((out[0] as i32 - 63).abs() <= 3, "{}", out[0]);
        let square = grey(28, 28, |x, y| (x + y) as u8);
        assert_eq!(
            eval_view(
                Sample::Pixels(square.clone()),
                1,
                28,
                Interpolation::Bicubic
            )
            .unwrap(),
            square.data
        );
    }
}
