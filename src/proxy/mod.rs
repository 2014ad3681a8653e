//! What happens to decrypted bytes: the route stages. `tcp` pipes them to a
//! TCP backend (layer 4). Backends themselves are chosen in `upstream`.

pub mod http;
pub mod idle;
pub mod tcp;
