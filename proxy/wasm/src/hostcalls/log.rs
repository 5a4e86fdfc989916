//! Logging: `proxy_log` (into the proxy's log, tagged with the filter's name) and
//! `proxy_get_log_level`.

use weft_abi::LogLevel;

use super::{C, ENV, status};
use crate::linker::HostLinker;
use crate::memory::{read, write_u32};

/// Adds the logging calls.
pub fn add_to_linker(l: &mut HostLinker) -> wasmtime::Result<()> {
    l.func_wrap(
        ENV,
        "proxy_log",
        |mut c: C<'_>, level: i32, ptr: i32, len: i32| {
            let level = LogLevel::from_i32(level);
            let message = match read(&mut c, ptr, len) {
                Ok(m) => m,
                Err(s) => return s as i32,
            };
            log_at(&c.data().plugin.name, level, &message);
            if let Some(lines) = c.data_mut().start_log.as_mut()
                && level.is_none_or(|l| l as i32 >= LogLevel::Info as i32)
            {
                remember(lines, &message);
            }
            status(Ok(()))
        },
    )?;
    l.func_wrap(ENV, "proxy_get_log_level", |mut c: C<'_>, ret: i32| {
        status(write_u32(&mut c, ret, log_level() as u32))
    })?;
    Ok(())
}

/// Most lines a starting filter's log keeps for its failure message.
const START_LOG_LINES: usize = 4;
/// Most bytes of one such line.
const START_LOG_LINE_BYTES: usize = 256;

/// Keeps `message` among the last lines a starting filter logged.
fn remember(lines: &mut std::collections::VecDeque<String>, message: &[u8]) {
    let mut line = String::from_utf8_lossy(message).trim().to_owned();
    if line.len() > START_LOG_LINE_BYTES {
        let mut cut = START_LOG_LINE_BYTES;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    if lines.len() == START_LOG_LINES {
        lines.pop_front();
    }
    lines.push_back(line);
}

/// Logs `msg` for filter `plugin` at proxy-wasm `level` (an unknown level logs as an error).
pub fn log_at(plugin: &str, level: Option<LogLevel>, msg: &[u8]) {
    let msg = String::from_utf8_lossy(msg);
    match level {
        Some(LogLevel::Trace) => tracing::trace!(filter = plugin, "{msg}"),
        Some(LogLevel::Debug) => tracing::debug!(filter = plugin, "{msg}"),
        Some(LogLevel::Info) => tracing::info!(filter = plugin, "{msg}"),
        Some(LogLevel::Warn) => tracing::warn!(filter = plugin, "{msg}"),
        Some(LogLevel::Error | LogLevel::Critical) | None => {
            tracing::error!(filter = plugin, "{msg}")
        }
    }
}

/// The proxy's log level in proxy-wasm terms.
fn log_level() -> LogLevel {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => LogLevel::Trace,
        LevelFilter::DEBUG => LogLevel::Debug,
        LevelFilter::INFO => LogLevel::Info,
        LevelFilter::WARN => LogLevel::Warn,
        LevelFilter::ERROR => LogLevel::Error,
        _ => LogLevel::Critical,
    }
}
