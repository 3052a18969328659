//! Protobuf messages of the EAS queue-service wire format (generated).

#[allow(clippy::all, missing_docs)]
pub mod streaming {
    tonic::include_proto!("streaming");
}

pub use streaming::{AttributesProto, DataFrameListProto, DataFrameProto};

/// Media type the SDKs send in `Accept` for protobuf bodies.
pub const PROTOBUF_MEDIA_TYPE: &str = "application/vnd.google.protobuf";
