//! The management API, mounted under `management.path` on the proxy listener.

use pingora::proxy::Session;

use crate::error::error_body;
use crate::gateway::{Gateway, RequestCtx};
use crate::respond::{self, Reply};

pub async fn serve(
    _gateway: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> pingora::Result<()> {
    let reply = Reply::json(
        404,
        error_body(
            "not_found",
            "the management API is not served yet",
            &ctx.request_id,
            None,
        ),
    );
    respond::send(session, reply, &ctx.request_id).await
}
