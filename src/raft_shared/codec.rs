//! bincode 2 (standard configuration, serde) encoding shared by the adapters of every openraft
//! version.

use std::io;

/// Encodes `value` with bincode 2 (standard config) at the end of `out`.
pub(crate) fn bincode_encode<T: serde::Serialize>(value: &T, out: &mut Vec<u8>) -> io::Result<()> {
    bincode::serde::encode_into_std_write(value, out, bincode::config::standard())
        .map(|_| ())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Decodes one bincode 2 value that must take all of `bytes`; `what` names it in errors.
pub(crate) fn bincode_decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> io::Result<T> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("cannot decode {what}: {e}"),
            )
        })?;
    if used != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "cannot decode {what}: {} trailing bytes",
                bytes.len() - used
            ),
        ));
    }
    Ok(value)
}
