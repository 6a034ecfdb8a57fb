//! Logs and traces: log lines to stderr as `RUST_LOG` says and, with the
//! feature `otel` and an OTLP endpoint, every span exported over OTLP
//! (HTTP), parented on the saga's trace context so one order's spans,
//! across services, form one trace.
//!
//! Without OpenTelemetry the spans still carry `trace_id`, `span_id` and
//! `parent_span_id` fields: a search of the logs for one trace id finds
//! every service's lines for one order.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The environment variable that names the OTLP collector (a base URL:
/// `/v1/traces` is appended), as OpenTelemetry's SDKs read it.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// What [`init`] installed; [`Telemetry::shutdown`] flushes the spans not
/// exported yet.
#[derive(Debug, Default)]
pub struct Telemetry {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        #[cfg(feature = "otel")]
        return self.provider.is_some();
        #[cfg(not(feature = "otel"))]
        false
    }

    /// Exports what is left and stops the exporter.
    pub fn shutdown(self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: OpenTelemetry export did not finish: {e}");
            }
        }
    }
}

/// Installs the process's subscriber: log lines on stderr filtered by
/// `RUST_LOG` (else `default_filter`), and, with `otlp_endpoint` (the
/// `--otlp-endpoint` flag or [`OTLP_ENDPOINT_ENV`]), the spans exported
/// to that collector (feature `otel`; without it a warning says the
/// endpoint is ignored). A second call changes nothing.
///
/// # Errors
/// If the OTLP exporter cannot be built (a malformed endpoint): the log
/// lines are installed all the same, without the export.
pub fn init(default_filter: &str, otlp_endpoint: Option<&str>) -> Result<Telemetry, String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    let Some(endpoint) = otlp_endpoint.filter(|e| !e.is_empty()) else {
        let _ = registry.try_init();
        return Ok(Telemetry::default());
    };
    #[cfg(feature = "otel")]
    {
        let provider = match otlp_provider(endpoint) {
            Ok(p) => p,
            Err(e) => {
                // The log lines are kept; only the export is off.
                let _ = registry.try_init();
                return Err(e);
            }
        };
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "ecommerce");
        let _ = registry
            .with(tracing_opentelemetry::layer().with_tracer(tracer))
            .try_init();
        tracing::info!(%endpoint, "exporting spans over OTLP");
        Ok(Telemetry {
            provider: Some(provider),
        })
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = registry.try_init();
        tracing::warn!(%endpoint, "an OTLP endpoint is set but this build has no `otel` feature: spans are not exported");
        Ok(Telemetry::default())
    }
}

/// A tracer provider exporting to the OTLP/HTTP collector at `endpoint`
/// (a base URL: `/v1/traces` is appended unless it is there).
#[cfg(feature = "otel")]
fn otlp_provider(endpoint: &str) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig;
    let base = endpoint.trim_end_matches('/');
    let url = if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()
        .map_err(|e| format!("cannot export spans to `{endpoint}`: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("ecommerce")
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
