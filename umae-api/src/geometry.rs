//! The shape of an image batch as the model sees it: channels, size and patch grid.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchGeometry {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub patch: usize,
}

impl PatchGeometry {
    /// Checks that the image divides into whole patches.
    pub fn new(channels: usize, height: usize, width: usize, patch: usize) -> Result<Self, String> {
        if channels == 0 || height == 0 || width == 0 || patch == 0 {
            return Err(format!(
                "image {channels}x{height}x{width} with patch {patch}: every size must be positive"
            ));
        }
        if !height.is_multiple_of(patch) || !width.is_multiple_of(patch) {
            return Err(format!(
                "image size {height}x{width} is not divisible by the patch size {patch}"
            ));
        }
        Ok(PatchGeometry {
            channels,
            height,
            width,
            patch,
        })
    }

    pub fn grid(&self) -> (usize, usize) {
        (self.height / self.patch, self.width / self.patch)
    }

    pub fn num_patches(&self) -> usize {
        let (h, w) = self.grid();
        h * w
    }

    /// Values per patch: patch * patch * channels.
    pub fn patch_dim(&self) -> usize {
        self.patch * self.patch * self.channels
    }
}
