agorafs_add_test(meta_store_test ${CMAKE_CURRENT_LIST_DIR}/meta_store_test.cc)
