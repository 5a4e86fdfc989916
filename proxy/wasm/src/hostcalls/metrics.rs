//! Filter-defined metrics: `proxy_define_metric`, `proxy_increment_metric`,
//! `proxy_record_metric`, `proxy_get_metric` (exposed with the proxy's own metrics).

use weft_abi::{MetricType, Status};
use weft_core::metrics::FilterMetricKind;

use super::{C, ENV, status};
use crate::linker::HostLinker;
use crate::memory::{read, write, write_u32};

/// Adds the metric calls.
pub fn add_to_linker(l: &mut HostLinker) -> wasmtime::Result<()> {
    l.func_wrap(
        ENV,
        "proxy_define_metric",
        |mut c: C<'_>, kind: i32, ptr: i32, len: i32, ret: i32| {
            let kind = match MetricType::from_i32(kind) {
                Some(MetricType::Counter) => FilterMetricKind::Counter,
                Some(MetricType::Gauge) => FilterMetricKind::Gauge,
                Some(MetricType::Histogram) => FilterMetricKind::Histogram,
                None => return Status::BadArgument as i32,
            };
            let name = match read(&mut c, ptr, len) {
                Ok(n) => String::from_utf8_lossy(&n).into_owned(),
                Err(s) => return s as i32,
            };
            let id = c.data().metrics.define(kind, &name);
            status(write_u32(&mut c, ret, id))
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_increment_metric",
        |mut c: C<'_>, id: i32, offset: i64| {
            let Some(m) = c.data_mut().metric(id as u32) else {
                return Status::NotFound as i32;
            };
            match m.kind {
                FilterMetricKind::Counter if offset < 0 => Status::BadArgument as i32,
                FilterMetricKind::Counter | FilterMetricKind::Gauge => {
                    m.add(offset);
                    Status::Ok as i32
                }
                FilterMetricKind::Histogram => Status::BadArgument as i32,
            }
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_record_metric",
        |mut c: C<'_>, id: i32, value: i64| {
            let Some(m) = c.data_mut().metric(id as u32) else {
                return Status::NotFound as i32;
            };
            match m.kind {
                FilterMetricKind::Counter => m.add(value),
                FilterMetricKind::Gauge => m.set(value),
                FilterMetricKind::Histogram => m.record(value as u64),
            }
            Status::Ok as i32
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, ret: i32| {
            let Some(m) = c.data_mut().metric(id as u32) else {
                return Status::NotFound as i32;
            };
            if m.kind == FilterMetricKind::Histogram {
                return Status::BadArgument as i32;
            }
            status(write(&mut c, ret, &(m.value() as u64).to_le_bytes()))
        },
    )?;
    Ok(())
}
