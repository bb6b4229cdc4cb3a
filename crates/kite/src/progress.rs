//! The conversion progress bar (indicatif), shown only on a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    pub fn new(enabled: bool) -> Self {
        let bar = ProgressBar::hidden();
        if enabled {
            // stderr, and only when it is a terminal (indicatif checks).
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Self { bar }
    }
    pub fn done(&self) {
        self.bar.finish_and_clear();
    }
}

impl kite_convert::Progress for Bar {
    fn layer(&self, index: usize, count: usize, label: &str, size: Option<u64>) {
        let short = label
            .strip_prefix("sha256:")
            .map(|h| &h[..12.min(h.len())])
            .unwrap_or(label);
        self.bar
            .set_message(format!("layer {}/{} {}", index + 1, count, short));
        self.bar.set_position(0);
        self.bar.set_length(size.unwrap_or(0));
    }
    fn bytes(&self, n: u64) {
        self.bar.inc(n);
    }
    fn finishing(&self) {
        self.bar.set_message("writing bootstrap");
    }
}
