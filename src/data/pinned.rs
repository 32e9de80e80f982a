//! Page-locked host buffers for the crops, with the event that says when the device has finished
//! reading them.
//!
//! cudarc's `PinnedHostSlice` records its event only on a context that tracks events itself, which
//! `Gpu::new` turns off (one stream, ordered by construction), and its waits go through
//! `CudaContext::bind_to_thread`, which takes (and so hides from the trainer) whatever error another
//! thread left in the context. Loader threads write these buffers, so this type waits with the
//! bare driver calls: a loader thread never reads or clears the context's sticky error. Buffers are
//! allocated on the trainer's thread ([`PinnedBuf::new`]), and the trainer records the event behind
//! each copy it queues ([`PinnedBuf::queued`]).

use cudarc::driver::{result, sys, CudaContext, CudaStream, DriverError};
use std::sync::Arc;

pub struct PinnedBuf {
    ptr: *mut u8,
    len: usize,
    event: sys::CUevent,
    ctx: Arc<CudaContext>,
}

// Safety: the memory is owned by this value alone; the event and context handles may be used from
// any thread (the driver's own rule), and `bind` makes the context current on the calling thread.
unsafe impl Send for PinnedBuf {}
unsafe impl Sync for PinnedBuf {}

impl PinnedBuf {
    /// `len` bytes of page-locked memory of `ctx` (contents unspecified) and an event with nothing
    /// recorded. Call it on the thread that owns the context's errors. Write-combined memory is
    /// fast to write and to copy to the device, and slow for the CPU to read: for uploads only.
    pub fn new(
        ctx: &Arc<CudaContext>,
        len: usize,
        write_combined: bool,
    ) -> Result<PinnedBuf, DriverError> {
        ctx.bind_to_thread()?;
        let flags = if write_combined {
            sys::CU_MEMHOSTALLOC_WRITECOMBINED
        } else {
            0
        };
        let ptr = unsafe { result::malloc_host(len.max(1), flags) }?;
        let event = match result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING) {
            Ok(e) => e,
            Err(e) => {
                let _ = unsafe { result::free_host(ptr) };
                return Err(e);
            }
        };
        Ok(PinnedBuf {
            ptr: ptr as *mut u8,
            len,
            event,
            ctx: ctx.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes the context current on this thread without touching its sticky error.
    fn bind(&self) -> Result<(), DriverError> {
        let cu = self.ctx.cu_ctx();
        if result::ctx::get_current()? != Some(cu) {
            unsafe { result::ctx::set_current(cu) }?;
        }
        Ok(())
    }

    /// Waits until every copy recorded by [`Self::queued`] has finished reading the buffer.
    pub fn wait(&self) -> Result<(), DriverError> {
        self.bind()?;
        unsafe { result::event::synchronize(self.event) }
    }

    /// The bytes, once the device is done with them.
    pub fn bytes(&self) -> Result<&[u8], DriverError> {
        self.wait()?;
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, self.len) })
    }

    /// The bytes for writing, once the device is done with them.
    pub fn bytes_mut(&mut self) -> Result<&mut [u8], DriverError> {
        self.wait()?;
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) })
    }

    /// Queues the copy of these bytes into `dst` on `stream` and records the event behind it, so
    /// that the next write ([`Self::bytes_mut`]) waits until the copy has read them.
    pub fn upload_to(
        &self,
        stream: &Arc<CudaStream>,
        dst: &mut cudarc::driver::CudaViewMut<'_, u8>,
    ) -> Result<(), DriverError> {
        // Whatever was queued with this buffer before is done (a writer waited for it already:
        // then this returns at once).
        self.wait()?;
        let src = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        stream.memcpy_htod(src, dst)?;
        self.queued(stream)
    }

    /// Queues a copy of `src` (as many bytes as this buffer holds) into this buffer on `stream`
    /// and records the event behind it: [`Self::bytes`] then waits for the bytes to arrive.
    pub fn download_from(
        &mut self,
        stream: &CudaStream,
        src: sys::CUdeviceptr,
    ) -> Result<(), DriverError> {
        self.wait()?;
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) };
        unsafe { result::memcpy_dtoh_async(dst, src, stream.cu_stream()) }?;
        self.queued(stream)
    }

    /// Records the event behind the work queued on `stream` so far: call it right after queuing
    /// the copies that read this buffer, so that the next write waits for them.
    pub fn queued(&self, stream: &CudaStream) -> Result<(), DriverError> {
        self.bind()?;
        unsafe { result::event::record(self.event, stream.cu_stream()) }
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        // Errors here have nowhere to go; the memory is the process's either way.
        let _ = self.wait();
        unsafe {
            let _ = result::event::destroy(self.event);
            let _ = result::free_host(self.ptr as *mut std::ffi::c_void);
        }
    }
}
